"""Peak memory of a training step on the CPU, measured in a fresh process per variant: the kernel's
peak-RSS count (VmHWM) restarted just before the measured steps, so the one-off peak of loading the
model is not what every variant reports."""
from __future__ import annotations

import ctypes
import gc
import json
import os
import resource
import subprocess
import sys


def rss_now_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def reset_peak_rss() -> bool:
    """Return freed heap to the OS and restart the kernel's peak-RSS count (VmHWM) from now: without
    it the process peak is the model load's, the same for every variant."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def probe(script: str, variant: str) -> dict:
    """Run `script --probe VARIANT <this command's arguments>` and read the JSON line it prints last."""
    out = subprocess.run([sys.executable, script, "--probe", variant, *sys.argv[1:]], check=True,
                         capture_output=True, text=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    print(f"memory {variant}: {result}", flush=True)
    return result
