"""--tensorboard and --wandb (smollm2/loggers.py): the logged steps' scalars read back with tensorboard's own
EventAccumulator, a resumed run continuing the same TensorBoard curve, a W&B offline run directory,
a missing package stopping the run before training in one line, and metrics.jsonl on resume:
the records up to the checkpoint kept, even when the disk is full."""
import errno
import glob
import json
import os

import sys

import pytest

from conftest import TINY, TRAIN_ENV, read_metrics, run_cmd, train_cmd
from smollm2 import files, loggers
from smollm2.loggers import MetricsFile


def scalars(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def train(folder, *args, env=None, status=0):
    return run_cmd(folder, *train_cmd(*TINY, "--eval-interval", 2, *args), status=status) if env is None else \
        run_cmd_env(folder, env, train_cmd(*TINY, "--eval-interval", 2, *args), status)


def run_cmd_env(folder, env, cmd, status):
    import subprocess
    proc = subprocess.run(cmd, cwd=folder, env={**TRAIN_ENV, **env}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == status, f"exit status {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def test_tensorboard_gets_loss_lr_and_val_loss_at_the_logged_steps(tmp_path, corpus):
    train(tmp_path, "--data", corpus, "--steps", 4, "--tensorboard", tmp_path / "tb")
    records, got = read_metrics(tmp_path / "metrics.jsonl"), scalars(tmp_path / "tb")
    assert {"train/loss", "train/lr", "train/grad_norm", "train/tokens_per_s", "val/loss"} <= set(got)
    for tag, key in (("train/loss", "loss"), ("train/lr", "lr"), ("val/loss", "val_loss")):
        expected = [(r["step"], r[key]) for r in records if key in r]
        assert [s for s, _ in got[tag]] == [s for s, _ in expected]
        assert [v for _, v in got[tag]] == pytest.approx([v for _, v in expected], rel=1e-6)  # float32
    assert [s for s, _ in got["val/loss"]] == [2, 4]


def test_a_resumed_run_continues_the_tensorboard_curve_without_duplicate_steps(tmp_path, corpus):
    tb = tmp_path / "tb"
    train(tmp_path, "--data", corpus, "--steps", 4, "--ckpt-interval", 2, "--tensorboard", tb)
    first = scalars(tb)["train/loss"]
    # resume from step 2: steps 3 and 4 of the first run are replaced, not doubled
    train(tmp_path, "--steps", 6, "--ckpt", tmp_path / "checkpoint_step_2.pt", "--tensorboard", tb)
    loss = scalars(tb)["train/loss"]
    assert [s for s, _ in loss] == [1, 2, 3, 4, 5, 6]
    assert [v for _, v in loss[:4]] == [v for _, v in first]  # exact resume: the same values
    # the resumed writer marks the restart (purge_step), so any reader drops the old steps 3 and 4
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    second = sorted(glob.glob(str(tb / "events.out.tfevents.*")))[-1]
    starts = [e.step for e in EventFileLoader(second).Load() if e.HasField("session_log")
              and e.session_log.status == e.session_log.START]
    assert starts == [3]


def test_wandb_offline_writes_a_run_directory_with_the_scalars(tmp_path, corpus):
    proc = train(tmp_path, "--data", corpus, "--steps", 2, "--wandb", "smollm2-test", env={"WANDB_MODE": "offline"})
    runs = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(runs) == 1, proc.stdout + proc.stderr
    with open(runs[0], "rb") as f:
        content = f.read()
    assert b"train/loss" in content and b"val/loss" in content and b"smollm2-test" in content


def test_wandb_disabled_trains_and_writes_nothing(tmp_path, corpus):
    train(tmp_path, "--data", corpus, "--steps", 2, "--wandb", "p", env={"WANDB_MODE": "disabled"})
    assert (tmp_path / "checkpoint.pt").exists() and not glob.glob(str(tmp_path / "wandb" / "*run-*"))


@pytest.mark.parametrize("flag, package", [("--tensorboard", "tensorboard"), ("--wandb", "wandb")])
def test_a_missing_tracker_package_is_one_line_and_exit_2_before_training(tmp_path, corpus, flag, package):
    fake = tmp_path / "site" / package
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(f"raise ImportError('no {package} here')\n")  # as if not installed
    proc = train(tmp_path, "--data", corpus, "--steps", 2, flag, tmp_path / "x",
                 env={"PYTHONPATH": str(tmp_path / "site")}, status=2)
    assert proc.stderr == f"train.py: error: {flag} needs the {package} package: pip install {package}\n"
    assert "step" not in proc.stdout and not (tmp_path / "checkpoint.pt").exists()


def test_metrics_on_resume_keep_the_records_up_to_the_checkpoint_and_append_after_them(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records = "".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 6))
    path.write_text(records + '{"step": 6, "lo')  # a write torn by a crash
    metrics = MetricsFile(str(path), resume_step=3)
    metrics.write({"step": 4, "loss": 0.5})
    metrics.close()
    assert [json.loads(line) for line in path.read_text().splitlines()] == \
        [{"step": s, "loss": 1.0 / s} for s in (1, 2, 3)] + [{"step": 4, "loss": 0.5}]
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]  # no temporary file left
    metrics = MetricsFile(str(path), resume_step=4)  # nothing to drop: appended to
    metrics.write({"step": 5, "loss": 0.25})
    metrics.close()
    assert path.read_text().count("\n") == 5 and json.loads(path.read_text().splitlines()[-1])["step"] == 5


def test_a_full_disk_while_dropping_records_on_resume_keeps_the_file_whole(tmp_path, monkeypatch, capsys):
    path = tmp_path / "metrics.jsonl"
    before = "".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(1, 6))
    path.write_text(before)

    def full_disk(path, write, real=files.atomic_write):
        def fail(f):
            f.write(b'{"step": 1')
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(path, fail)
    monkeypatch.setattr(loggers, "atomic_write", full_disk)  # where MetricsFile looks it up
    metrics = MetricsFile(str(path), resume_step=2)
    metrics.write({"step": 3, "loss": 0.5})
    metrics.write({"step": 4, "loss": 0.5})
    metrics.close()
    assert path.read_text() == before and [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]
    assert capsys.readouterr().err.splitlines() == [
        f"train.py: warning: could not write {path} at step 3 (No space left on device): training goes on, "
        "without the records it cannot write"]


def test_eta_rounds_once_then_splits_into_hours_minutes_seconds():
    from smollm2.loggers import eta_text
    assert eta_text(59.6) == "0h01m00s"  # not 0h00m60s
    assert eta_text(3599.5) == "1h00m00s" and eta_text(0) == "0h00m00s"
    assert eta_text(2 * 3600 + 35 * 60 + 59.4) == "2h35m59s"


def test_the_clock_waits_for_an_asynchronous_device_before_and_after_a_pause(monkeypatch):
    from smollm2 import devices, loggers
    waited = []
    monkeypatch.setattr(devices, "synchronize", lambda device: waited.append(str(device)))
    clock = loggers.Clock(0, "cuda:0")
    with clock.pause():
        waited.append("paused work")
    assert waited == ["cuda:0", "paused work", "cuda:0"]  # the steps before it count as training


def test_the_clock_stops_for_the_device_only_at_steps_that_evaluate_sample_or_save(tmp_path, corpus):
    """A GPU's clock pause waits for the device (devices.synchronize): a pause at every step would
    keep the host from preparing the next step while the GPU runs this one."""
    from conftest import patched_train
    script = patched_train(tmp_path, """
from smollm2 import devices
devices.synchronize = lambda device: print("device sync", flush=True)
""")
    proc = run_cmd(tmp_path, sys.executable, script, *TINY, "--data", corpus, "--steps", 9, "--log-interval", 1,
                   "--eval-interval", 6, "--sample-interval", 0, "--ckpt-interval", 0)
    lines = proc.stdout.splitlines()
    at = [i for i, line in enumerate(lines) if line.startswith("step ")]
    during = [line for line in lines[at[0]:] if line == "device sync"]
    # step 6 evaluates and keeps the best checkpoint, step 9 too (the last): two pauses each
    assert len(during) == 8, proc.stdout
