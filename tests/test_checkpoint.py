"""Checkpoints a run cannot lose: `--ckpt auto` after a crash, a full disk, changed data, a newer
format, best.pt. The CLI in a subprocess on the tiny preset, as in test_train.py."""
import hashlib
import os
import random
import re
import shutil
import signal
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, TINY, TRAIN_ENV, TRAIN_PY, load_ckpt, losses, read_metrics, run_cmd, run_train, train_cmd
from smollm2 import checkpoint, token_cache

# Constant LR (the horizon of a resumed run does not matter), a checkpoint every 4 steps, all kept.
AUTO = [*TINY, "--lr", "2e-3", "--min-lr", "2e-3", "--warmup", 0, "--ckpt-interval", 4, "--keep-last", 0,
        "--steps", 12, "--ckpt", "auto"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus):
    """The AUTO command run once, uninterrupted, in a folder with no checkpoint."""
    folder = tmp_path_factory.mktemp("reference")
    proc = run_train(folder, *AUTO, "--data", corpus)
    return folder, proc, losses(folder / "metrics.jsonl")


def damage(path, how):
    size = path.stat().st_size
    if how == "random bytes":
        path.write_bytes(random.Random(0).randbytes(size))
    else:
        path.write_bytes(path.read_bytes()[:size // 2])


# ----------------------------------------------------------------------------- --ckpt auto
def test_ckpt_auto_with_no_checkpoint_starts_a_new_run_and_says_where_it_looked_what_and_how_long(reference):
    folder, proc, got = reference
    said = proc.stdout.splitlines()[0]
    assert said.startswith(f"--ckpt auto: no checkpoint (checkpoint.pt, best.pt, checkpoint_step_N.pt) in {folder}: "
                           "starting a new run of tiny (4.9M parameters), 12 steps of 64 tokens: about "), said
    assert re.search(r": about \d+(\.\d)? (s|min|h) on this CPU, roughly$", said), said
    assert sorted(got) == list(range(1, 13)) and proc.stderr == ""
    assert sorted(p.name for p in folder.glob("*.pt")) == [  # best.pt: the one validation, at the end
        "best.pt", "checkpoint.pt", "checkpoint_step_12.pt", "checkpoint_step_4.pt", "checkpoint_step_8.pt"]


def test_ckpt_auto_after_sigkill_the_same_command_continues_step_for_step(tmp_path, corpus, reference):
    kill_after = random.Random().randint(5, 10)  # any step: between saves, or during one
    proc = subprocess.Popen(train_cmd(*AUTO, "--data", corpus), cwd=tmp_path, env=TRAIN_ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:
        if re.match(rf"step +{kill_after}/12", line):
            break
    proc.kill()
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    again = run_train(tmp_path, *AUTO, "--data", corpus)
    resumed = re.search(r"--ckpt auto: resuming from checkpoint_step_(\d+)\.pt at step (\d+)", again.stdout)
    assert resumed and resumed[1] == resumed[2] and int(resumed[1]) in (4, 8), (kill_after, again.stdout)
    assert losses(tmp_path / "metrics.jsonl") == reference[2]  # exact floats, every step
    assert not list(tmp_path.glob(".*.tmp"))  # a save the kill cut short leaves nothing behind
    final, ref = load_ckpt(tmp_path / "checkpoint.pt"), load_ckpt(reference[0] / "checkpoint.pt")
    assert all(torch.equal(final["model"][k], ref["model"][k]) for k in ref["model"])


def test_ckpt_auto_skips_a_corrupt_newest_checkpoint(tmp_path, corpus, reference):
    folder = reference[0]
    for name in ("checkpoint_step_4.pt", "checkpoint_step_8.pt"):
        shutil.copy(folder / name, tmp_path / name)
    shutil.copy(folder / "checkpoint_step_8.pt", tmp_path / "checkpoint.pt")
    damage(tmp_path / "checkpoint_step_8.pt", "random bytes")
    damage(tmp_path / "checkpoint.pt", "truncated")
    proc = run_train(tmp_path, *AUTO, "--data", corpus)
    notices = proc.stderr.strip().splitlines()
    assert len(notices) == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert all(n.startswith("train.py: --ckpt auto: skipping ") for n in notices)
    assert "checkpoint_step_8.pt: not a checkpoint (a binary file of unknown format (damaged" in proc.stderr
    assert "checkpoint.pt: not a readable checkpoint, truncated or corrupt" in proc.stderr  # a zip cut short
    assert "--ckpt auto: resuming from checkpoint_step_4.pt at step 4" in proc.stdout
    got = losses(tmp_path / "metrics.jsonl")
    assert sorted(got) == list(range(5, 13)) and all(got[s] == reference[2][s] for s in got)


def test_ckpt_auto_on_a_finished_run_has_nothing_to_do(tmp_path, corpus, reference):
    shutil.copy(reference[0] / "checkpoint.pt", tmp_path / "checkpoint.pt")
    proc = run_train(tmp_path, *AUTO, "--data", corpus)
    assert "is at step 12 already (--steps 12): nothing to train" in proc.stdout
    assert not (tmp_path / "metrics.jsonl").exists()


# ----------------------------------------------------------------------------- full disk
FAKE_DISK = """
import errno, collections, io, os, runpy, shutil, sys
import torch
DISK, LIMIT = os.path.abspath(sys.argv.pop(1)), int(sys.argv.pop(1))
def used():
    return sum(os.path.getsize(os.path.join(DISK, n)) for n in os.listdir(DISK))
real_usage = shutil.disk_usage
def disk_usage(path):
    if not os.path.abspath(path).startswith(DISK):
        return real_usage(path)
    return collections.namedtuple("usage", "total used free")(LIMIT, used(), LIMIT - used())
real_save = torch.save
def save(obj, f, *args, **kwargs):  # a disk of LIMIT bytes: ENOSPC once it is full
    buf = io.BytesIO()
    real_save(obj, buf, *args, **kwargs)
    room = LIMIT - used()
    if buf.tell() > room:
        f.write(buf.getvalue()[:max(room, 0)])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    f.write(buf.getvalue())
shutil.disk_usage, torch.save = disk_usage, save
sys.argv = ["train.py"] + sys.argv[1:]
sys.path.insert(0, {root!r})
runpy.run_path({train!r}, run_name="__main__")
"""


@pytest.fixture
def small_disk(tmp_path):
    """disk(megabytes) -> (folder, command prefix): a tmpfs of that size where this machine lets
    us mount one (as root), else a folder where ENOSPC is injected into torch.save once it holds
    that much."""
    mounted = []

    def disk(megabytes):
        folder = tmp_path / "disk"
        folder.mkdir()
        if not os.environ.get("SMOLLM2_FAKE_DISK") and shutil.which("mount") and os.geteuid() == 0:
            proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", folder],
                                  capture_output=True)
            if proc.returncode == 0:
                mounted.append(folder)
                return folder, train_cmd()
        script = tmp_path / "fake_disk.py"
        script.write_text(FAKE_DISK.format(root=ROOT, train=TRAIN_PY))
        return folder, [sys.executable, script, folder, megabytes * 2**20]

    yield disk
    for folder in mounted:
        subprocess.run(["umount", folder], check=True)


def test_a_disk_too_small_for_a_checkpoint_is_refused_before_training(tmp_path, corpus, small_disk):
    folder, cmd = small_disk(24)  # a tiny checkpoint is about 59 MB
    proc = run_cmd(tmp_path, *cmd, *TINY, "--data", corpus, "--steps", 5, "--save", folder / "ckpt.pt",
                   "--metrics", folder / "metrics.jsonl", status=2)
    err = proc.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    figures = re.search(r"error: not enough disk space for checkpoints in .*: ([\d.]+) MB free, ([\d.]+) MB "
                        r"needed \(a checkpoint of about ([\d.]+) MB plus its temporary copy", err)
    assert figures, err
    free, need, size = map(float, figures.groups())
    assert free <= 24 * 2**20 / 1e6 + 0.1 and 55 < size < 65 and need == pytest.approx(2 * size, abs=0.2)
    assert "step 1/" not in proc.stdout and os.listdir(folder) == []  # nothing trained, nothing written


def test_a_disk_that_fills_up_mid_run_loses_nothing_and_never_shows_a_traceback(tmp_path, corpus, small_disk):
    folder, cmd = small_disk(150)  # room for two checkpoints (and the disk check), not a third
    proc = run_cmd(tmp_path, *cmd, *TINY, "--data", corpus, "--steps", 8, "--ckpt-interval", 2, "--keep-last", 0,
                   "--save", folder / "ckpt.pt", "--metrics", folder / "metrics.jsonl", status=1)
    err = proc.stderr
    assert "Traceback" not in err
    good = f"the last good checkpoint is {folder / 'ckpt_step_4.pt'} (step 4)"  # named after --save ckpt.pt
    lines = err.strip().splitlines()
    assert lines[0].startswith(f"train.py: warning: could not save {folder / 'ckpt_step_6.pt'} at step 6 (")
    assert good in lines[0] and lines[0].endswith("training goes on, the next try is at step 8")
    assert lines[-1].startswith(f"train.py: error: could not save {folder / 'ckpt.pt'} at step 8 (")
    assert lines[-1].endswith(good)
    assert [r["step"] for r in read_metrics(folder / "metrics.jsonl")] == list(range(1, 9))  # went on
    assert sorted(os.listdir(folder)) == ["ckpt_loss.png", "ckpt_step_2.pt", "ckpt_step_4.pt",
                                          "metrics.jsonl"]  # no temporary files left, no lock
    assert checkpoint.load_checkpoint(str(folder / "ckpt_step_4.pt"))["step"] == 4


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="Linux's /dev/full: every write is ENOSPC")
def test_metrics_that_cannot_be_written_are_one_warning_and_the_run_goes_on(tmp_path, corpus):
    proc = run_train(tmp_path, *TINY, "--data", corpus, "--steps", 3, "--metrics", "/dev/full")
    assert proc.stderr.strip().splitlines() == [
        "train.py: warning: could not write /dev/full at step 1 (No space left on device): training goes on, "
        "without the records it cannot write"]  # said once, not at every step
    assert "step 3/3" in proc.stdout and load_ckpt(tmp_path / "checkpoint.pt")["step"] == 3


# ----------------------------------------------------------------------------- data, format, best
def test_resuming_on_changed_data_says_so_and_starts_at_the_beginning_of_the_new_data(tmp_path, corpus):
    text = tmp_path / "text.txt"
    shutil.copy(corpus, text)
    run_train(tmp_path, *TINY, "--data", text, "--steps", 3)
    before = load_ckpt(tmp_path / "checkpoint.pt")
    assert before["data_fingerprint"] == token_cache.fingerprint(str(text)) and before["data"]["position"] == 3 * 64
    text.write_text(text.read_text().replace("Citizen", "Townsman"))
    proc = run_train(tmp_path, "--steps", 5, "--ckpt", "checkpoint.pt")
    notice = proc.stderr.strip()
    assert len(notice.splitlines()) == 1 and notice.startswith("train.py: the data changed since the checkpoint")
    assert "the loader starts at the beginning of the new data" in notice
    after = load_ckpt(tmp_path / "checkpoint.pt")
    assert after["data"] == {"position": 2 * 64, "epoch": 0}  # two steps from the start, not 5 * 64
    assert after["data_fingerprint"] == token_cache.fingerprint(str(text)) != before["data_fingerprint"]

    other = tmp_path / "other.txt"  # --data naming another corpus: the same
    other.write_text(corpus.read_text()[5000:])
    proc = run_train(tmp_path, "--steps", 6, "--ckpt", "checkpoint.pt", "--data", other)
    assert "the data changed since the checkpoint" in proc.stderr
    assert load_ckpt(tmp_path / "checkpoint.pt")["data"] == {"position": 64, "epoch": 0}

    proc = run_train(tmp_path, "--steps", 7, "--ckpt", "checkpoint.pt")  # the same data: no notice
    assert proc.stderr == "" and load_ckpt(tmp_path / "checkpoint.pt")["data"]["position"] == 2 * 64


def test_a_newer_checkpoint_format_is_refused_and_versionless_ones_still_load(tmp_path, reference):
    ckpt = load_ckpt(reference[0] / "checkpoint_step_4.pt")
    assert ckpt["format_version"] == checkpoint.FORMAT_VERSION
    torch.save({**ckpt, "format_version": checkpoint.FORMAT_VERSION + 1}, tmp_path / "newer.pt")
    proc = run_train(tmp_path, "--steps", 6, "--ckpt", "newer.pt", status=2)
    version = checkpoint.FORMAT_VERSION
    assert proc.stderr.strip() == (f"train.py: error: --ckpt newer.pt: checkpoint format {version + 1} is newer "
                                   f"than this code's {version}: resume it with the version of train.py that wrote it")
    del ckpt["format_version"], ckpt["data_fingerprint"], ckpt["best"]  # as checkpoints were before
    torch.save(ckpt, tmp_path / "old.pt")
    run_train(tmp_path, "--steps", 5, "--ckpt", "old.pt")
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [5]


def test_best_pt_holds_the_step_of_the_lowest_validation_loss(tmp_path, corpus):
    # a high constant LR: the validation loss goes down, then up and down (its lowest at step 7 of 8)
    proc = run_train(tmp_path, *TINY, "--data", corpus, "--steps", 8, "--eval-interval", 1, "--lr", "3e-2",
                     "--min-lr", "3e-2", "--warmup", 0)
    vals = {r["step"]: r["val_loss"] for r in read_metrics(tmp_path / "metrics.jsonl")}
    best_step = min(vals, key=vals.get)
    assert best_step < 8 and sorted(vals) == list(range(1, 9))  # not simply the last one
    best = load_ckpt(tmp_path / "best.pt")
    assert best["step"] == best_step and best["val_loss"] == vals[best_step]
    assert best["best"] == {"step": best_step, "val_loss": vals[best_step]}
    assert f"best: best.pt at step {best_step}, val loss {vals[best_step]:.4f}" in proc.stdout
    assert load_ckpt(tmp_path / "checkpoint.pt")["best"]["step"] == best_step  # a resume keeps comparing
    from model import SmolLM2  # --export, --init and the Space load it like any checkpoint
    assert SmolLM2.from_pretrained(str(tmp_path / "best.pt")).source_info["step"] == best_step


# ----------------------------------------------------------------------------- run names
NAMED = [*TINY, "--eval-interval", 2, "--ckpt-interval", 2, "--keep-last", 0]


def digests(folder):
    """name -> sha256 of each file in folder."""
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir()}


def test_two_run_names_in_one_folder_never_touch_each_others_files(tmp_path, corpus):
    folder = tmp_path / "d"
    run_train(tmp_path, *NAMED, "--data", corpus, "--steps", 6, "--save", "d/fp32.pt")
    fp32 = digests(folder)
    assert sorted(fp32) == ["fp32.pt", "fp32_best.pt", "fp32_loss.png", "fp32_metrics.jsonl", "fp32_step_2.pt",
                            "fp32_step_4.pt", "fp32_step_6.pt"]
    run_train(tmp_path, *NAMED, "--data", corpus, "--steps", 4, "--save", "d/bf16.pt", "--dtype", "bf16")
    after = digests(folder)
    assert {name: after[name] for name in fp32} == fp32  # every file of the first run, byte for byte
    assert sorted(set(after) - set(fp32)) == ["bf16.pt", "bf16_best.pt", "bf16_loss.png", "bf16_metrics.jsonl",
                                              "bf16_step_2.pt", "bf16_step_4.pt"]

    # --ckpt auto follows the run's own name: bf16's step 4, not fp32's newer step 6
    proc = run_train(tmp_path, "--steps", 6, "--ckpt", "auto", "--save", "d/bf16.pt")
    assert "resuming from d/bf16" in proc.stdout and "d/fp32" not in proc.stdout + proc.stderr
    resumed = load_ckpt(folder / "bf16.pt")
    assert resumed["step"] == 6 and resumed["args"]["dtype"] == "bf16"
    assert resumed["args"]["metrics"] == "d/bf16_metrics.jsonl"  # the default, derived from --save, is kept
    assert [r["step"] for r in read_metrics(folder / "bf16_metrics.jsonl")] == list(range(1, 7))
    # a checkpoint resumed under another --save: that run's files are named after the new one
    run_train(tmp_path, "--steps", 3, "--ckpt", "d/fp32_step_2.pt", "--save", "d/more.pt")
    after = digests(folder)
    assert {name: after[name] for name in fp32} == fp32
    assert [r["step"] for r in read_metrics(folder / "more_metrics.jsonl")] == [3]
    assert {"more.pt", "more_best.pt", "more_loss.png"} <= set(after)


# ----------------------------------------------------------------------------- --save linked to best
def test_a_final_save_at_best_is_a_hard_link_to_it_and_a_later_best_leaves_it_as_it_was(tmp_path, corpus):
    # validation at steps 0 and 4, the last: best.pt is written at the step of the final save
    proc = run_train(tmp_path, *TINY, "--data", corpus, "--steps", 4, "--lr", "2e-3", "--min-lr", "2e-3",
                     "--warmup", 0, "--save", "run/checkpoint.pt")
    save, best = tmp_path / "run/checkpoint.pt", tmp_path / "run/best.pt"
    assert save.stat().st_ino == best.stat().st_ino and save.stat().st_nlink == 2
    assert ("saved run/checkpoint.pt at step 4 (a hard link to run/best.pt, the same checkpoint); loss curve "
            "run/loss.png") in proc.stdout
    assert load_ckpt(save)["step"] == 4 and load_ckpt(save)["best"]["step"] == 4
    before = save.read_bytes()
    # resumed (at the constant LR past the horizon), best.pt is written anew; killed before its final save
    resumed = subprocess.Popen(train_cmd("--steps", 1000, "--ckpt", "run/checkpoint.pt", "--eval-interval", 1),
                               cwd=tmp_path, env=TRAIN_ENV, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                               text=True)
    for line in resumed.stdout:
        if line.startswith("best: run/best.pt at step "):
            break
    resumed.kill()
    resumed.wait()
    assert load_ckpt(best)["step"] > 4
    assert save.read_bytes() == before and save.stat().st_nlink == 1  # atomic_write replaced best.pt's name only


NO_LINKS = """
import errno, os, runpy, sys
def link(*args, **kwargs):  # a filesystem without hard links
    raise OSError(errno.EPERM, os.strerror(errno.EPERM))
os.link = link
sys.argv = ["train.py"] + sys.argv[1:]
sys.path.insert(0, {root!r})
runpy.run_path({train!r}, run_name="__main__")
"""


def test_where_hard_links_fail_the_final_save_is_written_in_full(tmp_path, corpus):
    script = tmp_path / "no_links.py"
    script.write_text(NO_LINKS.format(root=ROOT, train=TRAIN_PY))
    proc = run_cmd(tmp_path, sys.executable, script, *TINY, "--data", corpus, "--steps", 4)
    assert "saved checkpoint.pt at step 4; loss curve loss.png" in proc.stdout and proc.stderr == ""
    save, best = tmp_path / "checkpoint.pt", tmp_path / "best.pt"
    assert save.stat().st_ino != best.stat().st_ino and save.stat().st_nlink == 1
    assert load_ckpt(save)["step"] == load_ckpt(best)["step"] == 4
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_missing_periodic_checkpoint_names_the_same_step_under_the_runs_own_name(tmp_path):
    """Scripts written for checkpoint_step_N.pt beside a --save of another name find the new name."""
    (tmp_path / "final_step_100.pt").write_bytes(b"PK")
    message = ""
    try:
        checkpoint.load_checkpoint(str(tmp_path / "checkpoint_step_100.pt"))
    except checkpoint.CheckpointError as e:
        message = str(e)
    assert message.endswith("checkpoint_step_100.pt: no such file (step 100 here: final_step_100.pt; periodic "
                            "checkpoints are named after their run's --save)")
    with pytest.raises(checkpoint.CheckpointError, match=r"gone\.pt: no such file$"):
        checkpoint.load_checkpoint(str(tmp_path / "gone.pt"))
