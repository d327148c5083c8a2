"""One training run per --save (smollm2/run_lock.py): a second run started on it is refused in one
line and the first finishes unharmed; a SIGKILLed run's lock does not block the next one."""
import re
import signal
import subprocess

import pytest

from conftest import TINY, TRAIN_ENV, load_ckpt, read_metrics, run_train, train_cmd
from smollm2.errors import UsageError
from smollm2.run_lock import RunLock


def start(folder, *args):
    """train.py started in folder, returned once its first step is logged (it holds its lock by then)."""
    proc = subprocess.Popen(train_cmd(*args), cwd=folder, env=TRAIN_ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if re.match(r"step +1/", line):
            return proc
    proc.kill()
    raise AssertionError(f"no first step: {proc.communicate()}")


def test_a_second_run_on_the_same_save_is_refused_in_one_line_and_the_first_is_unharmed(tmp_path, corpus):
    run = [*TINY, "--data", corpus, "--steps", 20, "--save", "runs/dup/checkpoint.pt"]
    first = start(tmp_path, *run)
    first.send_signal(signal.SIGSTOP)  # still at step 1 whatever the second one's start-up takes
    try:
        second = run_train(tmp_path, *run, status=2)
    finally:
        first.send_signal(signal.SIGCONT)
    assert second.stderr.splitlines() == [
        f"train.py: error: another training run (pid {first.pid}) is writing runs/dup/checkpoint.pt (it holds "
        "runs/dup/checkpoint.pt.lock): wait for it to finish, or give another --save"]
    assert second.stdout == ""
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    records = read_metrics(tmp_path / "runs/dup/metrics.jsonl")  # every line a JSON record
    assert [r["step"] for r in records] == list(range(1, 21))
    assert load_ckpt(tmp_path / "runs/dup/checkpoint.pt")["step"] == 20
    assert not (tmp_path / "runs/dup/checkpoint.pt.lock").exists()  # released at exit


def test_a_sigkilled_runs_lock_does_not_block_the_next_run(tmp_path, corpus):
    run = [*TINY, "--data", corpus, "--save", "run/checkpoint.pt"]
    first = start(tmp_path, *run, "--steps", 100_000)
    first.kill()
    first.wait()
    lock = tmp_path / "run/checkpoint.pt.lock"
    assert lock.read_text() == f"{first.pid}\n"  # left behind, but no process holds it any more
    run_train(tmp_path, *run, "--steps", 3)
    assert load_ckpt(tmp_path / "run/checkpoint.pt")["step"] == 3 and not lock.exists()


def test_the_lock_is_held_until_released(tmp_path):
    save = str(tmp_path / "new" / "ckpt.pt")  # its folder is made
    lock = RunLock(save)
    with pytest.raises(UsageError, match=r"another training run \(pid \d+\) is writing .*ckpt.pt"):
        RunLock(save)  # flock: another open of the file, even in this process
    lock.release()
    assert not (tmp_path / "new" / "ckpt.pt.lock").exists()
    RunLock(save).release()
