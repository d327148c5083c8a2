"""Writing files so that a crash or a full disk never leaves half of one: atomic_write; refusing,
before the work, an output path that could not be written (check_writable); and naming a file in what
we publish without this machine's folders (public_name)."""
import contextlib
import os

from smollm2.errors import UsageError


def temp_path(path):
    """The temporary name a file is written under beside path before it takes path's name (the
    process id in it: checkpoint.py removes those of processes that are gone)."""
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{name}.{os.getpid()}.tmp")


def sync_folder(folder):
    """fsync a folder: a rename into it is then durable."""
    fd = os.open(folder, os.O_RDONLY)
    os.fsync(fd)
    os.close(fd)


def atomic_write(path, write):
    """write(file) into a temp file beside path, fsync, rename over path, fsync the directory."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = temp_path(path)
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
    sync_folder(folder)


def atomic_link(source, path):
    """Make path a hard link to source (the same bytes, not a copy of them): a new link beside path,
    renamed over it, so a crash leaves the old path whole. Later atomic_writes of either name replace
    that name only. False, with path untouched, where the filesystem cannot (no hard links, another
    device)."""
    tmp = temp_path(path)
    try:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        os.link(source, tmp)
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        return False
    with contextlib.suppress(OSError):  # rename(2) does nothing when both names are already one file
        os.remove(tmp)
    sync_folder(os.path.dirname(tmp))
    return True


def existing_folder(path):
    """The folder of path, or its nearest existing ancestor: what we would create the rest in."""
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    return folder


def check_writable(*paths, directory=False):
    """Refuse output paths that could not be written, rather than fail after hours of work. A
    directory output (directory=True) is checked in itself where it exists, since its files go
    inside it; a file, or a directory still to be made, in its nearest existing folder."""
    for path in paths:
        folder = path if directory and os.path.isdir(path) else existing_folder(path)
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            raise UsageError(f"cannot write {path}: {folder} is not a writable directory")


def public_name(value):
    """value with no folder of this machine: an absolute path (or hf:PATH) becomes its file name; hub
    ids, relative paths and anything not a string are kept."""
    if not isinstance(value, str):
        return value
    scheme = "hf:" if value.startswith("hf:") else ""
    path = value[len(scheme):]
    if os.path.isabs(path) or path.startswith("~"):
        return scheme + os.path.basename(os.path.normpath(path))
    return value
