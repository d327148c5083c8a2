"""smollm2/signals.py: every rank stops at the same step boundary, agreed by a host-side all-reduce
after each step; under torchrun a second signal hurries the save instead of abandoning it."""
import os
import signal
import subprocess
import sys
import time

from conftest import ROOT, TINY, TRAIN_ENV, TRAIN_PY, load_ckpt
from smollm2.signals import StopSignals


class FakeProc:
    """A Process as StopSignals sees it: world processes, any_rank recorded (one rank's view)."""

    def __init__(self, world, others=False):
        self.world, self.master, self.device, self.others, self.asked = world, True, "cpu", others, []

    def any_rank(self, flag):
        self.asked.append(flag)
        return flag or self.others


def test_should_stop_asks_every_rank_at_every_step_and_any_ranks_signal_stops_all():
    proc = FakeProc(2)
    stop = StopSignals(proc)
    assert stop.should_stop() is False and proc.asked == [False]
    stop.received = signal.SIGTERM
    assert stop.should_stop() is True and proc.asked == [False, True]
    other = FakeProc(2, others=True)  # the signal reached another rank only
    assert StopSignals(other).should_stop() is True


def test_under_torchrun_a_second_signal_hurries_the_save_instead_of_stopping_at_once(capsys):
    with StopSignals(FakeProc(2)) as stop:
        os.kill(os.getpid(), signal.SIGTERM)  # torchrun's forwarded SIGTERM
        os.kill(os.getpid(), signal.SIGTERM)  # and the scheduler's own, to the worker (SLURM)
        os.kill(os.getpid(), signal.SIGINT)
    assert stop.received == signal.SIGTERM and stop.hurry  # still alive: the save comes
    err = capsys.readouterr().err
    assert "SIGTERM: finishing this step, then saving a checkpoint (torchrun kills workers --shutdown_timeout" in err
    assert err.count("again: saving at the end of this step") == 1, err


def test_a_torchrun_run_signalled_twice_on_every_worker_saves_at_the_next_step_and_resumes(tmp_path, corpus):
    """As a SLURM job's end: SIGTERM to torchrun (which forwards it) and to every worker directly.
    Every rank stops at the same step boundary, rank 0 saves, and the checkpoint resumes."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", TRAIN_PY,
           *TINY, "--steps", "100000", "--log-interval", "1000", "--data", corpus, "--save", "run/ckpt.pt"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=TRAIN_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        for line in proc.stdout:  # training has started on both ranks once rank 0 describes the run
            if line.startswith("LR: "):
                break
        time.sleep(3)  # some steps, none of them a log step: the stop is agreed at an ordinary step
        with open(f"/proc/{proc.pid}/task/{proc.pid}/children") as f:
            workers = [int(pid) for pid in f.read().split()]
        assert len(workers) == 2
        proc.send_signal(signal.SIGTERM)
        for pid in workers:
            os.kill(pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    ckpt = load_ckpt(tmp_path / "run/ckpt.pt")
    assert 0 < ckpt["step"] < 100000 and f"saved run/ckpt.pt at step {ckpt['step']}" in out, out + err
    assert "nothing more is saved" not in err, err  # (the two signals may also arrive as one)
    resumed = subprocess.run([sys.executable, TRAIN_PY, "--steps", str(ckpt["step"] + 1), "--ckpt", "run/ckpt.pt",
                              "--save", "run/more.pt"], cwd=tmp_path, env=TRAIN_ENV, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0 and load_ckpt(tmp_path / "run/more.pt")["step"] == ckpt["step"] + 1, resumed.stderr
