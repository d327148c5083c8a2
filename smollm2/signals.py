"""Stopping a run cleanly on SIGINT (Ctrl-C) or SIGTERM: the step under way finishes, a checkpoint is
saved, then the run stops. Alone, the same signal a second time stops at once, saying what was saved
and how to resume. Under torchrun a second signal only hurries the save (no evaluation or sample
first): torchrun forwards its SIGTERM to every worker, and a scheduler such as SLURM may signal the
workers too, so each can see one stop twice; abandoning the save then would lose the run. Every rank
stops at the same step boundary, agreed by an all-reduce of a CPU flag on the gloo group after each
step (no device sync). torchrun kills its workers --shutdown_timeout seconds (default 30) after its
SIGTERM: raise it where a checkpoint takes longer to write."""
import os
import signal
import sys

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopSignals:
    """Catches SIGINT and SIGTERM while installed (`with StopSignals(proc) as stop:`); `received`
    holds the first one caught, if any. saved: a callable giving, when a second signal stops the
    run at once, what was saved so far and the command that resumes (train.saved_so_far)."""

    def __init__(self, proc, saved=None):
        self.proc, self.received, self.previous, self.saved = proc, None, {}, saved
        self.hurry = False  # under torchrun, a second signal: save at once, no evaluation or sample first

    def __enter__(self):
        self.previous = {signum: signal.getsignal(signum) for signum in SIGNALS}
        for signum in SIGNALS:
            signal.signal(signum, self.on_signal)
        return self

    def __exit__(self, *exc):
        for signum, handler in self.previous.items():  # theirs again
            signal.signal(signum, handler)

    def on_signal(self, signum, frame):
        name = signal.Signals(signum).name
        if self.received is not None and self.proc.world > 1:  # torchrun's and the scheduler's, maybe
            if self.proc.master and not self.hurry:
                print(f"\n{name} again: saving at the end of this step, before anything else (torchrun "
                      "kills workers --shutdown_timeout seconds, default 30, after its SIGTERM)",
                      file=sys.stderr, flush=True)
            self.hurry = True
            return
        if self.received == signum:  # the same signal twice (Ctrl-C Ctrl-C): stop now, no save
            try:
                if self.proc.master:
                    print(f"\n{name} again: stopping now, nothing more is saved"
                          + (f"; {self.saved()}" if self.saved else ""), file=sys.stderr, flush=True)
            finally:  # whatever happens to that line, the user asked to stop
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)
        self.received = signum
        if self.proc.master:
            then = ("send it again to stop at once" if self.proc.world == 1 else
                    "torchrun kills workers --shutdown_timeout seconds, default 30, after its SIGTERM")
            print(f"\n{name}: finishing this step, then saving a checkpoint ({then})", file=sys.stderr, flush=True)

    def should_stop(self):
        """Whether a signal asks every rank to stop after this step: any rank's signal stops them all
        (Process.any_rank: a host-side all-reduce, cheap enough for every step)."""
        return self.proc.any_rank(self.received is not None)
