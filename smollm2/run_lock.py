"""One training run per --save: the run (rank 0 of torchrun's) holds an exclusive lock on
<save>.lock from before anything heavy until it exits.

Two runs started on one --save both exit 0 having overwritten each other's checkpoints and
interleaved their records into one metrics file that is no longer JSON lines; the second is refused
instead. The lock is flock(2) on the open file, not the file's existence: the kernel drops it when
its process dies, so a SIGKILLed run never blocks the next one (the file it leaves is stale and is
simply locked again). The file holds the holder's pid, for the refusal. Where fcntl is missing
(Windows), or the filesystem has no flock, runs are not locked.
"""
import contextlib
import os

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

from smollm2.errors import UsageError


class RunLock:
    """The lock on `<save>.lock`, taken at once: UsageError when another run holds it. release()
    gives it back and removes the file."""

    def __init__(self, save):
        self.path, self.fd = f"{save}.lock", None
        if fcntl is None:
            return
        try:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            while self.fd is None:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = os.read(fd, 32).decode(errors="replace").strip()
                    os.close(fd)
                    pid = f" (pid {holder})" if holder.isdigit() else ""
                    raise UsageError(f"another training run{pid} is writing {save} (it holds {self.path}): "
                                     "wait for it to finish, or give another --save") from None
                except OSError:  # a filesystem without flock (some network mounts): run unlocked
                    os.close(fd)
                    return
                if _same_file(fd, self.path):
                    self.fd = fd
                else:  # its holder removed it between our open and our lock: lock the new one
                    os.close(fd)
        except OSError as e:
            raise UsageError(f"cannot write {self.path}, the lock of --save {save} "
                             f"({e.strerror or e})") from None
        with contextlib.suppress(OSError):  # the pid only names the holder: a full disk may keep it out
            os.ftruncate(self.fd, 0)
            os.write(self.fd, f"{os.getpid()}\n".encode())

    def release(self):
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.remove(self.path)  # while locked: a run that opened it already finds it gone
            os.close(self.fd)
            self.fd = None


def _same_file(fd, path):
    """Whether path still names the file open as fd."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)
