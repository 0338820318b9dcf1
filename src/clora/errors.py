"""The one exception type for user mistakes: the CLI prints its message on one line and exits 2."""
from __future__ import annotations

import errno
from contextlib import contextmanager
from pathlib import Path


class UserError(Exception):
    """Bad input from the user (file, item, option). The message names what is wrong."""


@contextmanager
def guard_disk(path: str | Path):
    """A full disk or an unwritable folder while writing `path` is the user's to fix, not a crash."""
    try:
        yield
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise UserError(f"disk full while writing {path}: free space there and rerun with --resume") from None
        if exc.errno in (errno.EACCES, errno.EROFS, errno.EPERM):
            raise UserError(f"cannot write {path}: {exc.strerror}") from None
        raise
