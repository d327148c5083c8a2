"""train.py as its users meet it: the CLI run in a subprocess on the tiny preset, a few steps each
(one thread per run: see conftest.TRAIN_ENV)."""
import math
import re
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from conftest import (ROOT, TINY, TRAIN_ENV, TRAIN_PY, load_ckpt, losses, read_metrics, run_cmd, run_train,
                      train_cmd)
from smollm2.errors import UsageError
from smollm2.train_args import build_parser
from smollm2.optim import get_lr


@pytest.fixture(scope="module")
def good_run(tmp_path_factory, corpus):
    """A finished 3-step run with validation at every step and periodic checkpoints (keep 2)."""
    folder = tmp_path_factory.mktemp("good")
    proc = run_train(folder, *TINY, "--data", corpus, "--steps", 3, "--eval-interval", 1,
                     "--ckpt-interval", 1, "--keep-last", 2)
    return folder, proc


# ----------------------------------------------------------------------------- LR schedule
def test_lr_warms_up_linearly_then_decays_by_cosine_to_min_lr_at_the_horizon():
    lr = lambda step: get_lr(step, lr=1.0, min_lr=0.1, warmup=10, horizon=110)  # noqa: E731
    assert [lr(s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert lr(10) == pytest.approx(1.0)
    assert lr(60) == pytest.approx(0.55)  # half way through the cosine: the mean of lr and min_lr
    assert all(lr(s) > lr(s + 1) for s in range(10, 109))
    assert lr(109) == pytest.approx(0.1, abs=1e-3)


def test_lr_stays_at_min_lr_past_the_horizon_of_the_first_run():
    assert [get_lr(s, 3e-4, 3e-5, 100, 5000) for s in (5000, 5001, 5049, 10**6)] == [3e-5] * 4


def test_a_warmup_longer_than_the_run_is_a_warning_in_the_lr_line(tmp_path, corpus, good_run):
    proc = run_train(tmp_path, *TINY, "--data", corpus, "--steps", 2, "--warmup", 100)
    lr_line = next(line for line in proc.stdout.splitlines() if line.startswith("LR: "))
    assert lr_line.endswith("(warning: the warmup is longer than the run's 2 steps: the LR never reaches its peak "
                            "0.003; lower --warmup)"), lr_line
    assert max(r["lr"] for r in read_metrics(tmp_path / "metrics.jsonl")) < 3e-3  # indeed
    assert "warning" not in good_run[1].stdout  # --warmup 2 of --steps 3: the peak is reached


# ----------------------------------------------------------------------------- a normal run
def test_a_run_prints_summary_and_progress_and_writes_checkpoint_metrics_and_loss_curve(good_run):
    folder, proc = good_run
    out = proc.stdout
    assert "total" in out and "4,915,680" in out and "FLOPs per token" in out
    assert "tokens" in out and "unique_tokens" in out and "batches per epoch" in out
    assert "cosine to 3e-05 at step 3" in out
    assert "step 3/3 | loss " in out and "tok/s" in out and "ETA" in out and "grad" in out
    assert proc.stderr == ""
    with open(folder / "loss.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in folder.glob("*.pt")) == [
        "best.pt", "checkpoint.pt", "checkpoint_step_2.pt", "checkpoint_step_3.pt"]  # --keep-last 2


def test_metrics_jsonl_has_one_record_per_logged_step_with_val_loss_at_eval_steps(good_run):
    folder, _ = good_run
    records = read_metrics(folder / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3]
    for r in records:
        assert {"step", "loss", "lr", "grad_norm", "tok_s", "val_loss"} <= set(r)
        assert all(math.isfinite(r[k]) and r[k] > 0 for k in ("loss", "lr", "grad_norm", "tok_s", "val_loss"))
    assert 10 < records[0]["loss"] < 12  # about ln(49152) = 10.8 at random init


def test_checkpoint_loads_with_weights_only_and_holds_everything_resume_needs(good_run):
    folder, _ = good_run
    ckpt = load_ckpt(folder / "checkpoint.pt")
    assert {"model", "config", "step", "val_loss", "optimizer", "lr_horizon", "data", "rng", "args"} <= set(ckpt)
    assert ckpt["step"] == 3 and ckpt["lr_horizon"] == 3 and ckpt["args"]["model"] == "tiny"
    assert ckpt["data"] == {"position": 3 * 2 * 32, "epoch": 0}
    assert math.isfinite(ckpt["val_loss"])
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in ckpt["model"])
    assert load_ckpt(folder / "checkpoint_step_2.pt")["step"] == 2


# ----------------------------------------------------------------------------- exact resume
def test_resume_from_step_n_reproduces_a_2n_step_run_bit_for_bit(tmp_path, corpus):
    run_train(tmp_path, *TINY, "--data", corpus, "--steps", 6, "--ckpt-interval", 3,
              "--save", "full/ckpt.pt", "--metrics", "full/metrics.jsonl")
    proc = run_train(tmp_path, "--steps", 6, "--ckpt", "full/ckpt_step_3.pt",
                     "--save", "resumed/ckpt.pt", "--metrics", "resumed/metrics.jsonl")
    assert "cosine to 3e-05 at step 6" in proc.stdout  # the first run's horizon
    full, resumed = losses(tmp_path / "full/metrics.jsonl"), losses(tmp_path / "resumed/metrics.jsonl")
    assert sorted(resumed) == [4, 5, 6]
    assert [resumed[s] for s in (4, 5, 6)] == [full[s] for s in (4, 5, 6)]  # exact float equality
    a, b = load_ckpt(tmp_path / "full/ckpt.pt"), load_ckpt(tmp_path / "resumed/ckpt.pt")
    assert a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["data"] == b["data"] and a["val_loss"] == b["val_loss"]


def test_steps_past_the_first_runs_horizon_run_at_min_lr(tmp_path, good_run):
    folder, _ = good_run
    shutil.copy(folder / "checkpoint.pt", tmp_path / "checkpoint.pt")
    proc = run_train(tmp_path, "--steps", 5, "--ckpt", "checkpoint.pt")
    assert "steps 4..5 are past the horizon" in proc.stdout
    assert [r["lr"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [3e-5, 3e-5]
    assert load_ckpt(tmp_path / "checkpoint.pt")["step"] == 5


def test_an_explicit_ckpt_says_it_resumes_from_it_at_its_step(tmp_path, good_run):
    shutil.copy(good_run[0] / "checkpoint.pt", tmp_path / "checkpoint.pt")
    proc = run_train(tmp_path, "--steps", 4, "--ckpt", "checkpoint.pt")
    assert proc.stdout.startswith("resuming from checkpoint.pt at step 3\n"), proc.stdout


def test_a_resume_without_plot_redraws_the_runs_own_plot(tmp_path, corpus):
    run_train(tmp_path, *TINY, "--data", corpus, "--steps", 2, "--plot", "custom.png")
    plot = tmp_path / "custom.png"
    before = (plot.read_bytes(), plot.stat().st_mtime_ns)
    proc = run_train(tmp_path, "--steps", 3, "--ckpt", "checkpoint.pt")
    assert re.search(r"^saved checkpoint.pt at step 3.*; loss curve custom.png$", proc.stdout, re.M), proc.stdout
    assert plot.read_bytes() != before[0] and plot.stat().st_mtime_ns != before[1]  # the curve to step 3
    assert not (tmp_path / "loss.png").exists()


# ----------------------------------------------------------------------------- stopping
@pytest.fixture(scope="module")
def constant_lr_reference(tmp_path_factory, corpus):
    """12 uninterrupted steps at a constant LR (so the horizon does not matter)."""
    folder = tmp_path_factory.mktemp("reference")
    run_train(folder, *TINY, "--data", corpus, "--steps", 12, "--lr", "2e-3", "--min-lr", "2e-3", "--warmup", 0)
    return losses(folder / "metrics.jsonl")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_finishes_the_step_saves_prints_the_resume_command_and_resume_is_exact(
        tmp_path, corpus, constant_lr_reference, signum):
    proc = subprocess.Popen(train_cmd(*TINY, "--data", corpus, "--steps", 1000, "--lr", "2e-3",
                                      "--min-lr", "2e-3", "--warmup", 0),
                            cwd=tmp_path, env=TRAIN_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:  # wait until training is under way
        if re.match(r"step +2/1000", line):
            break
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum
    assert "Traceback" not in err
    step = load_ckpt(tmp_path / "checkpoint.pt")["step"]
    assert 2 <= step < 12 and f"step {step:>4}/1000" in out  # the step under way was finished
    assert "python train.py --steps 1000 --ckpt checkpoint.pt" in out
    run_train(tmp_path, "--steps", 12, "--ckpt", "checkpoint.pt")
    got = losses(tmp_path / "metrics.jsonl")  # the records up to `step` are kept on resume
    assert got == constant_lr_reference


def slow_save_script(tmp_path):
    """train.py with torch.save of checkpoint.pt slowed down: it writes half the bytes, says so, then sleeps."""
    script = tmp_path / "slow_save.py"
    script.write_text(f"""
import io, runpy, sys, time
import torch
real_save = torch.save
def slow_save(obj, f, *args, **kwargs):
    if ".checkpoint.pt." not in f.name:  # best.pt goes by at full speed
        return real_save(obj, f, *args, **kwargs)
    buf = io.BytesIO()
    real_save(obj, buf, *args, **kwargs)
    data = buf.getvalue()
    f.write(data[:len(data) // 2])
    f.flush()
    print("HALF-WRITTEN", flush=True)
    time.sleep(600)
    f.write(data[len(data) // 2:])
torch.save = slow_save
sys.argv = ["train.py"] + sys.argv[1:]
sys.path.insert(0, {ROOT!r})
runpy.run_path({TRAIN_PY!r}, run_name="__main__")
""")
    return script


def test_sigkill_during_a_save_leaves_the_previous_checkpoint_whole(tmp_path, good_run):
    folder, _ = good_run
    shutil.copy(folder / "checkpoint.pt", tmp_path / "checkpoint.pt")
    before = (tmp_path / "checkpoint.pt").read_bytes()
    proc = subprocess.Popen([sys.executable, slow_save_script(tmp_path), "--steps", "5", "--ckpt", "checkpoint.pt",
                             "--ckpt-interval", "0", "--val-frac", "0"],  # no best.pt at step 5 to link to
                            cwd=tmp_path, env=TRAIN_ENV, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:
        if line.startswith("HALF-WRITTEN"):
            break
    proc.kill()
    proc.wait()
    partial = list(tmp_path.glob(".checkpoint.pt.*.tmp"))
    assert len(partial) == 1 and 0 < partial[0].stat().st_size < len(before)  # killed mid-write
    assert (tmp_path / "checkpoint.pt").read_bytes() == before
    assert load_ckpt(tmp_path / "checkpoint.pt")["step"] == 3


def test_a_second_sigint_stops_at_once_saying_what_was_saved_and_how_to_resume(tmp_path, corpus):
    run_train(tmp_path, *TINY, "--data", corpus, "--steps", 2)  # best.pt at step 2, checkpoint.pt a link to it
    # resumed: checkpoint_step_4.pt, then Ctrl-C; the final save of checkpoint.pt is slow: Ctrl-C again
    proc = subprocess.Popen([sys.executable, slow_save_script(tmp_path), "--steps", "1000", "--ckpt", "checkpoint.pt",
                             "--ckpt-interval", "4", "--eval-interval", "1000"],
                            cwd=tmp_path, env=TRAIN_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if re.match(r"step +5/1000", line):  # checkpoint_step_4.pt is saved
            break
    proc.send_signal(signal.SIGINT)
    for line in proc.stdout:
        if line.startswith("HALF-WRITTEN"):  # the final save is under way
            break
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGINT  # killed by the signal itself: a shell shows status 130
    assert "Traceback" not in err
    said = re.fullmatch(r"SIGINT again: stopping now, nothing more is saved; the last checkpoint is "
                        r"(checkpoint_step_(\d+)\.pt) at step (\d+), the best best.pt at step 2; resume with: "
                        r"python train.py --steps 1000 --ckpt (\S+)", err.strip().splitlines()[-1])
    assert said and said[2] == said[3] and said[4] == said[1], err  # step 4, or 8 on a slow pipe
    assert load_ckpt(tmp_path / said[1])["step"] == int(said[3]) and load_ckpt(tmp_path / "best.pt")["step"] == 2


def test_with_nothing_saved_a_second_signal_says_so_and_under_torchrun_the_command_is_torchruns(tmp_path):
    from smollm2.report import saved_so_far
    args = type("Args", (), {"steps": 700})()
    saver = type("Saver", (), {"last_good": None, "best": None, "best_path": str(tmp_path / "best.pt")})()
    assert saved_so_far(saver, args, type("Proc", (), {"world": 1})()) == "nothing was saved yet"
    saver.last_good = ("runs/my run/ckpt_step_8.pt", 8)
    assert saved_so_far(saver, args, type("Proc", (), {"world": 2})()) == (
        "the last checkpoint is runs/my run/ckpt_step_8.pt at step 8; resume with: torchrun --nproc_per_node=2 "
        "train.py --steps 700 --ckpt 'runs/my run/ckpt_step_8.pt'")


HANDLERS_AROUND_MAIN = """
import signal, sys
sys.path.insert(0, {root!r})
import train
before = [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)]
assert train.main(sys.argv[1:]) == 0
assert [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)] == before
print("handlers restored")
"""


def test_main_gives_the_signal_handlers_back(tmp_path, corpus):
    """train.main installs its own SIGINT/SIGTERM handlers (they hold the run) for the loop only."""
    proc = run_cmd(tmp_path, sys.executable, "-c", HANDLERS_AROUND_MAIN.format(root=ROOT), *TINY, "--steps", "2",
                   "--data", corpus, "--save", "ckpt.pt")
    assert "handlers restored" in proc.stdout


# ----------------------------------------------------------------------------- bad input
DATA = ["--model", "tiny", "--data", "{corpus}"]
BAD_INPUTS = {  # case -> (arguments, what the one-line error must say)
    "missing data": (["--model", "tiny", "--data", "nope.txt"], "nope.txt"),
    "empty data": (["--model", "tiny", "--data", "empty.txt"], "empty"),
    "binary data": (["--model", "tiny", "--data", "binary.bin"], "binary"),
    "non-UTF-8 data": (["--model", "tiny", "--data", "latin1.txt"], "UTF-8"),
    "data shorter than one batch": (["--model", "tiny", "--data", "short.txt", "--batch-size", "2",
                                     "--seq-len", "32"], "need 65 tokens"),
    "validation split shorter than one batch": ([*DATA, "--val-frac", "0.001"], "--val-frac"),
    "steps not above the checkpoint's": (["--steps", "3", "--ckpt", "checkpoint.pt"], "--steps 53"),
    "missing checkpoint": (["--steps", "9", "--ckpt", "gone.pt"], "no such file"),
    "truncated checkpoint": (["--steps", "9", "--ckpt", "truncated.pt"], "truncated or corrupt"),
    "text file as checkpoint": (["--steps", "9", "--ckpt", "notes.pt"], "--ckpt notes.pt: not a checkpoint (a text "
                                "file); resume from a checkpoint.pt that train.py saved, or start from weights with "
                                "--init"),
    "the training text as checkpoint": (["--steps", "9", "--ckpt", "input.txt"],
                                        "--ckpt input.txt: not a checkpoint (a text file)"),
    "GGUF weights as checkpoint": (["--steps", "9", "--ckpt", "model.gguf"], "--ckpt model.gguf: not a training "
                                   "checkpoint but model weights (a GGUF file); to start a new run from them use "
                                   "--init model.gguf"),
    "safetensors weights as checkpoint": (["--steps", "9", "--ckpt", "model.safetensors"], "model weights (a "
                                          "safetensors file); to start a new run from them use --init"),
    "random bytes as checkpoint": (["--steps", "9", "--ckpt", "random.pt"], "not a checkpoint (a binary file of "
                                   "unknown format"),
    "folder as checkpoint": (["--steps", "9", "--ckpt", "."], "--ckpt .: a folder, not a checkpoint file; to start "
                             "a new run from an HF model directory use --init"),
    "weights-only file as checkpoint": (["--steps", "9", "--ckpt", "weights.pt"], "use --init"),
    "checkpoint of another model": (["--steps", "9", "--ckpt", "checkpoint.pt", "--model", "smollm2-135m"],
                                    "hidden_size 96 vs 576"),
    "resume and init at once": (["--steps", "9", "--ckpt", "checkpoint.pt", "--init", "checkpoint.pt"], "--init"),
    "zero batch size": ([*DATA, "--batch-size", "0"], "argument --batch-size: must be > 0, got 0"),
    "negative lr": ([*DATA, "--lr", "-1"], "argument --lr: must be > 0, got -1"),
    "seq len beyond the context window": ([*DATA, "--seq-len", "4096"], "context window"),
    "unwritable save path": ([*DATA, "--save", "notes.pt/checkpoint.pt"], "cannot write"),
}


def snapshot(folder):
    """name -> (inode, mtime, contents hash): a rewrite, a replace or a new file all show."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns, hash(p.read_bytes()))
            for p in folder.iterdir() if ".tokens." not in p.name}  # a cache of good data may appear


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory, corpus, good_run):
    """Every bad-input run, started at once, each in a folder holding (hard links to) a good
    checkpoint as checkpoint.pt, the default --save."""
    base = tmp_path_factory.mktemp("bad")
    shutil.copy(good_run[0] / "checkpoint.pt", base / "checkpoint.pt")
    good = load_ckpt(base / "checkpoint.pt")
    (base / "empty.txt").write_text("")
    (base / "binary.bin").write_bytes(bytes(range(256)) * 4)
    (base / "latin1.txt").write_bytes("naïve café façade ".encode("latin-1") * 50)
    (base / "short.txt").write_text("To be, or not to be")
    (base / "truncated.pt").write_bytes((base / "checkpoint.pt").read_bytes()[:1_000_000])
    (base / "notes.pt").write_text("not a checkpoint")
    (base / "input.txt").write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n")
    (base / "model.gguf").write_bytes(b"GGUF" + (3).to_bytes(4, "little") + bytes(64))  # GGUF's magic, version 3
    save_file({"w": torch.zeros(4)}, base / "model.safetensors")
    (base / "random.pt").write_bytes(bytes([7, 200, 13]) * 1000)
    torch.save({"model": good["model"], "config": good["config"]}, base / "weights.pt")
    runs = {}
    for i, (case, (args, expected)) in enumerate(BAD_INPUTS.items()):
        folder = base / f"case{i}"
        folder.mkdir()
        for p in base.iterdir():
            if p.is_file():
                os.link(p, folder / p.name)
        args = [a.format(corpus=corpus) for a in args]
        proc = subprocess.Popen(train_cmd(*args), cwd=folder, env=TRAIN_ENV, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        runs[case] = (proc, expected, folder, snapshot(folder))
    return runs


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_gives_one_line_on_stderr_exit_2_and_writes_no_checkpoint(bad_runs, case):
    proc, expected, folder, before = bad_runs[case]
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("train.py: error: ") and expected in err, err
    assert snapshot(folder) == before  # nothing written, nothing overwritten


@pytest.mark.parametrize("flag", ["--steps", "--batch-size", "--seq-len", "--grad-accum", "--lr",
                                  "--eval-interval", "--eval-iters", "--log-interval", "--sample-tokens"])
@pytest.mark.parametrize("value", ["0", "-3"])
def test_sizes_must_be_positive(flag, value):
    with pytest.raises(UsageError, match=f"argument {flag}: must be > 0, got {value}"):
        build_parser().parse_args([flag, value])


@pytest.mark.parametrize("flag", ["--min-lr", "--warmup", "--weight-decay", "--grad-clip", "--val-frac",
                                  "--ckpt-interval", "--keep-last", "--sample-interval"])
def test_counts_and_rates_may_be_zero_but_not_negative(flag):
    assert build_parser().parse_args([flag, "0"]) is not None
    with pytest.raises(UsageError, match=f"argument {flag}: must be >= 0, got -1"):
        build_parser().parse_args([flag, "-1"])


# ----------------------------------------------------------------------------- dtype, compile
def test_bf16_autocast_on_cpu_trains(tmp_path, corpus):
    proc = run_train(tmp_path, *TINY, "--data", corpus, "--steps", 12, "--dtype", "bf16", "--eval-interval", 12)
    assert "cpu, bf16" in proc.stdout
    records = read_metrics(tmp_path / "metrics.jsonl")
    first, last = records[0]["loss"], sum(r["loss"] for r in records[-3:]) / 3
    assert first > 10.5 and last < first - 1.0
    assert load_ckpt(tmp_path / "checkpoint.pt")["model"]["lm_head.weight"].dtype == torch.float32


def test_compile_on_cpu_trains_and_saves_a_checkpoint_without_orig_mod_prefixes(tmp_path, corpus):
    proc = run_train(tmp_path, *TINY, "--data", corpus, "--steps", 2, "--compile", "--val-frac", 0, timeout=600)
    assert "cpu, fp32, compiled" in proc.stdout and "compile: --compile on" in proc.stdout
    ckpt = load_ckpt(tmp_path / "checkpoint.pt")
    assert ckpt["step"] == 2 and ckpt["args"]["compile"] == "on"
    assert not any("_orig_mod" in k for k in ckpt["model"]) and "lm_head.weight" in ckpt["model"]


# torch.compile that cannot build anything, as on a machine without a C++ compiler; --compile auto
# made to compile even a tiny run, as it compiles the 135M model's 5000 steps on CPU
NO_COMPILER = """
import sys, torch
sys.path.insert(0, {root!r})
import train
from smollm2 import devices
from smollm2.errors import UserError
devices.COMPILE_MIN_PARAMS = devices.COMPILE_MIN_STEPS = 0
def cannot_compile(model, **kw):
    def call(*args, **kwargs):
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")
    return call
torch.compile = cannot_compile
try:
    status = train.main(sys.argv[1:])
    print("deterministic mode:", torch.are_deterministic_algorithms_enabled())  # set for compiling only
    sys.exit(status)
except UserError as e:
    print(f"train.py: error: {{e}}", file=sys.stderr)
    sys.exit(2)
"""


def test_compile_auto_trains_eagerly_where_torch_compile_fails_and_compile_on_stops(tmp_path, corpus):
    script = NO_COMPILER.format(root=ROOT)
    proc = run_cmd(tmp_path, sys.executable, "-c", script, *TINY, "--data", corpus, "--steps", 3)
    assert "compile: eager: torch.compile failed here (RuntimeError)" in proc.stdout
    assert "deterministic mode: False" in proc.stdout
    assert load_ckpt(tmp_path / "checkpoint.pt")["step"] == 3
    proc = run_cmd(tmp_path, sys.executable, "-c", script, *TINY, "--data", corpus, "--steps", 3,
                   "--compile", "on", "--save", "other.pt", status=2)
    assert proc.stderr.strip().splitlines() == [
        "train.py: error: --compile on: torch.compile failed here (RuntimeError: InvalidCxxCompiler: No working "
        "C++ compiler found); train with --compile off"]
    assert not (tmp_path / "other.pt").exists()


def test_compile_auto_is_eager_for_a_tiny_run_and_says_why(tmp_path, corpus):
    proc = run_train(tmp_path, *TINY, "--data", corpus, "--steps", 1, "--val-frac", 0)
    assert "device cpu, fp32\n" in proc.stdout
    assert "compile: eager: --compile auto compiles runs of >= 500 steps of models of >= 100M parameters" in proc.stdout


# ----------------------------------------------------------------------------- memory
RSS_AFTER_FREE = """
import sys, torch
from smollm2 import speedups
if sys.argv[1] == "keep":
    assert speedups.keep_freed_memory()
def rss_mb():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) // 1024
before = rss_mb()
x = torch.ones(100 * 2**20 // 4)  # 100 MB, written
del x
print(rss_mb() - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_keep_freed_memory_keeps_a_freed_block_for_the_next_step():
    def kept_mb(mode):
        out = subprocess.run([sys.executable, "-c", RSS_AFTER_FREE, mode], cwd=ROOT, capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        return int(out.stdout.split()[-1])
    assert kept_mb("default") < 20  # glibc hands a freed 100 MB block back to the kernel...
    assert kept_mb("keep") >= 95  # ...unless told to keep it: no page faults to get it back


# ----------------------------------------------------------------------------- real size
@pytest.mark.slow
def test_real_size_smollm2_135m_starts_near_ln_vocab_and_learns(tmp_path, corpus):
    run_train(tmp_path, "--model", "smollm2-135m", "--data", corpus, "--steps", 5, "--batch-size", 1,
              "--seq-len", 64, "--lr", "6e-4", "--warmup", 2, "--eval-iters", 2, "--eval-interval", 5,
              "--log-interval", 1, "--sample-interval", 0, "--ckpt-interval", 0, timeout=600)
    history = load_ckpt(tmp_path / "checkpoint.pt")["history"]
    assert history["val_step"] == [0, 5]
    first_val, last_val = history["val_loss"]
    assert abs(history["loss"][0] - math.log(49152)) < 1.0 and abs(first_val - math.log(49152)) < 1.0
    assert last_val < first_val - 0.5, history


def test_help_ends_with_the_readmes_commands_as_examples(tmp_path):
    out = run_cmd(tmp_path, *train_cmd("--help")).stdout
    examples = out[out.index("\nexamples:\n"):]
    for command in ("python train.py --steps 5000 ", "python train.py --steps 5050 --ckpt checkpoint.pt ",
                    "python train.py --steps 5000 --ckpt auto ", "python train.py --model tiny --steps 500 "):
        assert f"\n  {command}" in examples, examples  # one command a line, as written
    assert examples.rstrip().endswith("Run-defining settings not given on resume are taken from the checkpoint.")
