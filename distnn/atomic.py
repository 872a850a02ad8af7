"""Atomic file writes: a reader, or a crash, sees the old file or the whole new one, never half.

The new content goes to a temp file beside the target (`.NAME.PID.HEX8.tmp`, created exclusively,
so a leftover or a link of that name is never written through), is fsynced, and is renamed over
the target; the directory is fsynced after, which makes the rename itself durable. TEMP_NAME
matches these names, for deleting the temp files a killed writer left.
"""
import os
import re
import secrets
from pathlib import Path

# .NAME.PID.HEX8.tmp; the HEX8 part is optional, so the shorter .NAME.PID.tmp counts as one too
TEMP_NAME = re.compile(r"\.(?P<name>.+?)\.\d+(\.[0-9a-f]{8})?\.tmp")


def write_atomically(path, write, binary=False, through=False) -> None:
    """write(f) to a temp file beside `path`, then rename it over `path`. With `through` (a user's
    output file) anything but a plain file (a link, a FIFO, /dev/stdout) is written in place
    instead, where renaming over it would replace it; without it, a link at `path` is replaced,
    never written through. An OSError names `path` (its __cause__ is the system's error)."""
    path = Path(path)
    if through and (path.is_symlink() or (path.exists() and not path.is_file())):
        try:
            with open(path, "wb") if binary else open(path, "w", newline="") as f:
                write(f)
        except OSError as e:
            raise _naming(path, e) from e
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # 0o666: honour the umask
    except OSError as e:
        raise _naming(path, e) from e
    try:
        with os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", newline="") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise _naming(path, e) from e
        raise
    _fsync_directory(path.parent)


def _fsync_directory(directory) -> None:
    """Make the rename durable where the directory allows it: the new file is in place either
    way, and a directory that cannot be read or fsynced (mode 0o300, some filesystems) costs only
    the rename's durability, not the write."""
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


def _naming(path, error) -> OSError:
    return OSError(f"{path}: cannot write ({error.strerror or error})")
