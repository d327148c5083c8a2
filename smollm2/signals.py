"""Stopping a run cleanly on SIGINT (Ctrl-C) or SIGTERM: the step under way finishes, a checkpoint is
saved, then the run stops; the same signal a second time stops at once, saying what was saved and how
to resume. Under DDP every rank stops at the same step, agreed by an all-reduce at log steps only (a
host sync)."""
import os
import signal
import sys

import torch
import torch.distributed as dist

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """Catches SIGINT and SIGTERM while installed (`with StopSignals(proc) as stop:`); `received`
    holds the first one caught, if any. saved: a callable giving, when a second signal stops the
    run at once, what was saved so far and the command that resumes (train.saved_so_far)."""

    def __init__(self, proc, saved=None):
        self.proc, self.received, self.previous, self.saved = proc, None, {}, saved

    def __enter__(self):
        self.previous = {signum: signal.getsignal(signum) for signum in SIGNALS}
        for signum in SIGNALS:
            signal.signal(signum, self.on_signal)
        return self

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():  # theirs again
            signal.signal(signum, handler)

    def on_signal(self, signum, frame):
        if self.received == signum:  # the same signal twice (Ctrl-C Ctrl-C): stop now, no save
            try:
                if self.proc.master:
                    print(f"\n{signal.Signals(signum).name} again: stopping now, nothing more is saved"
                          + (f"; {self.saved()}" if self.saved else ""), file=sys.stderr, flush=True)
            finally:  # whatever happens to that line, the user asked to stop
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
        self.received = signum
        if self.proc.master:
            print(f"\n{signal.Signals(signum).name}: finishing this step, then saving a checkpoint "
                  "(send it again to stop at once)", file=sys.stderr, flush=True)

    def should_stop(self, sync):
        """Whether a signal asks every rank to stop now. Across ranks that is an all-reduce and a host
        sync, so only at the steps given as `sync` (log steps, the same on every rank)."""
        if self.proc.world == 1:
            return self.received is not None
        if not sync:
            return False
        flag = torch.tensor(float(self.received is not None), device=self.proc.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # every rank stops at the same step
        return bool(flag.item())
