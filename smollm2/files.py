"""Writing files so that a crash or a full disk never leaves half of one: atomic_write; and refusing,
before the work, an output path that could not be written (check_writable)."""
import contextlib
import os

from smollm2.errors import UsageError


def atomic_write(path, write):
    """write(file) into a temp file beside path, fsync, rename over path, fsync the directory."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    fd = os.open(folder, os.O_RDONLY)  # make the rename itself durable
    os.fsync(fd)
    os.close(fd)


def existing_folder(path):
    """The folder of path, or its nearest existing ancestor: what we would create the rest in."""
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    return folder


def check_writable(*paths):
    """Refuse output paths that could not be written, rather than fail after hours of training."""
    for path in paths:
        folder = existing_folder(path)
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            raise UsageError(f"cannot write {path}: {folder} is not a writable directory")
