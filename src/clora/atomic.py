"""Atomic file writes: a result file is either the complete old version or the complete new one.

A run can be killed at any moment (and is expected to resume), so a half-written metrics.json or
adapter must never be left where a reader would take it for a finished result. Everything is written
to a hidden temporary file in the same directory (same filesystem, so ``os.replace`` is atomic),
flushed to disk, then renamed over the target.
"""

from __future__ import annotations

import json
import os
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

__all__ = ["atomic_path", "write_bytes_atomic", "write_json_atomic", "write_text_atomic"]


def _reserve_temp_path(target: Path) -> Path:
    # Leading "." and trailing ".tmp": never matched by globs for finished results (*.json, *.png).
    # O_EXCL reserves the name against a concurrent writer; mode 0o666 lets the umask decide the final
    # permissions, as a plain open() would (mkstemp would force 0o600 onto the result).
    for _ in range(100):
        candidate = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
        try:
            fd = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return candidate
    raise FileExistsError(f"could not create a temporary file next to {target}")


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable. Not every platform/filesystem allows fsync on a directory;
    # the data is already safe at that point, so failure here is not worth failing the write.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on a clean exit it replaces ``path`` atomically.

    For writers that insist on a file name (``fig.savefig``, safetensors ``save_file``, ...). The
    temporary file exists (empty) when the block starts; the writer overwrites it. If the block
    raises, the temporary file is removed and ``path`` keeps its old content (or stays absent).

    The temporary name ends in ``.tmp``, so writers that infer a format from the extension need it
    given explicitly (``fig.savefig(tmp, format="png")``).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _reserve_temp_path(target)
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, target)
    except BaseException:
        # BaseException too: a KeyboardInterrupt mid-write must not leave the temp file behind.
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    # Explicit UTF-8 and no newline translation: identical bytes on every platform.
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    # Serialise before touching the disk: an unserialisable object fails with the old file intact.
    # allow_nan=False because NaN/Infinity are not JSON and break other readers; use None instead.
    text = json.dumps(obj, indent=2, sort_keys=False, ensure_ascii=False, allow_nan=False)
    write_text_atomic(path, text + "\n")
