"""The errors a user can fix: bad flags, data, checkpoints, weights or export requests. Every entry
point prints one as one line on stderr and exits with status 2 (cli.main_guard), never a traceback.
"""


class UserError(ValueError):
    """Input the user can fix; the message says what was wrong and what to do, in one line."""


class UsageError(UserError):
    """A bad command line or an impossible request."""


class DataError(UserError):
    """Bad training or evaluation data."""


class CheckpointError(UserError):
    """A checkpoint that cannot be resumed, or no room to write one."""


class ModelLoadError(UserError):
    """A model source that cannot be loaded; the message says what was wrong and what was expected."""


class ExportError(UserError):
    """An export that cannot be made (a dtype, a path, the hub)."""


class MissingPackage(UserError):
    """An optional integration was asked for but its package is not installed: what to pip install."""


def reason(e):
    """A library's exception in a few words, for an error line: its kind and its message's first line."""
    message = str(e).strip()
    return f"{type(e).__name__}: {message.splitlines()[0][:160]}" if message else type(e).__name__
