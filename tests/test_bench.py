"""The benchmarks (bench/) run end to end on a tiny model and compile as train.py would."""
import argparse
import json
import os
import re
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, run_cmd
from model import PRESETS, SmolLM2, SmolLM2Config


@pytest.mark.slow
def test_bench_runs_on_a_tiny_model_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    run = subprocess.run([sys.executable, "-m", "bench", "--model", "tiny", "--repeats", "1",
                          "--warmup", "0", "--no-compile-generate", "--checkpointing", "--json", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["train"]["ours"]["tokens_per_s"] > 0 and res["train"]["hf"]["peak_memory_bytes"] > 0
    if "ours-mkl" in res["train"] or "ours-onednn" in res["train"]:  # x86: the other GEMM route, and MFU
        other = res["train"].get("ours-mkl") or res["train"]["ours-onednn"]
        assert other["tokens_per_s"] > 0 and 0 < res["train"]["ours"]["mfu"] < 1
    assert res["generate"]["same_tokens_as_hf"] == {"ours_eager": True}
    assert 0 < res["generate"]["bound"]["tokens_per_s"]
    assert "tokens/s" in run.stdout and "ours/tf" in run.stdout
    rows = res["checkpointing"]["rows"]  # tiny's window is 1024: T=256 only
    assert set(rows) == {"T256_off", "T256_on"} and all(r["peak_memory_bytes"] > 0 for r in rows.values())
    assert "gradient checkpointing, ours" in run.stdout


@pytest.mark.slow
def test_bench_space_serves_a_tiny_model_and_compares_it_with_model_py(tmp_path):
    torch.manual_seed(0)
    config = SmolLM2Config(**{**PRESETS["tiny"].__dict__, "max_position_embeddings": 256})  # one cache size
    SmolLM2(config).save_pretrained(tmp_path / "tiny")
    run = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "space.py"), "--weights", str(tmp_path / "tiny"),
                          "--tokens", "16", "--rounds", "1"], capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    space, ours, ratio = (float(re.search(pattern, run.stdout).group(1)) for pattern in (
        r"Space, one user .*: ([\d.]+) tokens/s", r"generate\(compile=True\): +([\d.]+) tokens/s",
        r"Space / model.py: ([\d.]+)"))
    assert space > 0 and ours > 0 and ratio == pytest.approx(space / ours, rel=0.01)
    first, eager, cold = (float(re.search(pattern, run.stdout).group(1)) for pattern in (
        r"first request after start-up .*: ([\d.]+) tokens/s", r"model.py eager, this run .*: ([\d.]+) tokens/s",
        r"first request / eager: ([\d.]+)"))  # the cold start: a request sent as the app came up
    assert first > 0 and eager > 0 and cold == pytest.approx(first / eager, rel=0.01)
    assert "eager decoder (warming up)" in run.stdout  # it was answered while the compiled decoder was built


def test_bench_load_sends_users_at_once_and_accounts_for_every_request(tmp_path):
    torch.manual_seed(0)
    SmolLM2(PRESETS["tiny"]).save_pretrained(tmp_path / "tiny")
    run = subprocess.run([sys.executable, "-m", "bench.load", "--weights", str(tmp_path / "tiny"), "--users", "3",
                          "--tokens", "8", "--seconds", "5"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    one, together, ratio, same = re.search(r"one after another: ([\d.]+) tokens/s; all at once: ([\d.]+) tokens/s "
                                           r"\(([\d.]+)x\); the same answers: (\d) of 3", run.stdout).groups()
    assert float(ratio) == pytest.approx(float(together) / float(one), rel=0.02) and same == "3"
    answered, refused = re.search(r"3 users for 5 s: (\d+) answered, (\d+) refused", run.stdout).groups()
    assert int(answered) >= 3 and refused == "0" and "first token p50" in run.stdout
    firsts = re.search(r"a user joining 2 busy ones: first token after ([\d., ]+) s", run.stdout).group(1)
    assert len(firsts.split(", ")) == 3 and all(float(f) > 0 for f in firsts.split(", "))


@pytest.mark.slow
def test_bench_decode_batch_times_eager_and_compiled_steps_per_batch_size():
    run = subprocess.run([sys.executable, "-m", "bench.decode_batch", "--model", "tiny", "--sizes", "1,2",
                          "--steps", "2"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    number = r" +([\d.e+]+)"
    rows = re.findall(r"^ +(\d)" + number * 6 + "$", run.stdout, re.M)
    assert [r[0] for r in rows] == ["1", "2"], run.stdout
    for _, eager, kernel, kernel_ratio, compiled, compiled_ratio, _ in rows:  # tokens/s and their ratios to eager
        assert float(kernel_ratio) == pytest.approx(float(kernel) / float(eager), rel=0.01), run.stdout
        assert float(compiled_ratio) == pytest.approx(float(compiled) / float(eager), rel=0.01), run.stdout


def test_bench_compiles_ours_as_train_py_would_and_transformers_only_when_asked():
    from bench import speed as bench
    auto = lambda device, model="smollm2-135m": argparse.Namespace(compile="auto", device=device, model=model)
    assert bench.compiled(auto("cpu"), "ours") and bench.compiled(auto("cpu"), "ours-mkl")
    assert not bench.compiled(auto("cpu"), "ours-eager") and not bench.compiled(auto("cpu"), "hf")
    assert not bench.compiled(auto("cpu", "tiny"), "ours") and not bench.compiled(auto("cuda"), "ours")
    for setting in ("on", "off"):
        both = argparse.Namespace(compile=setting, device="cpu", model="smollm2-135m")
        assert bench.compiled(both, "ours") == bench.compiled(both, "hf") == (setting == "on")


def test_bench_sharding_shows_fsdp_holding_half_of_ddps_state_per_rank():
    proc = subprocess.run([sys.executable, "-m", "bench.sharding", "--model", "tiny", "--seq-len", "16"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    held = {m[0]: float(m[1]) for m in re.findall(r"(ddp|fsdp) +rank 0: weights \+ gradients \+ AdamW held ([\d.]+) MiB",
                                                  proc.stdout)}
    assert held["fsdp"] == pytest.approx(held["ddp"] / 2, rel=0.05), proc.stdout


def test_bench_chat_batching_gives_packed_and_padded_conversations_the_same_loss():
    proc = run_cmd(ROOT, sys.executable, "-m", "bench.chat_batching", "--weights", "tiny", "--seq-len", "128",
                   "--batch-size", "2", "--steps", "1", "--rounds", "1")
    out = proc.stdout
    padded = re.search(r"padded loss on the first 64 rows \(.*\): ([\d.]+) over ([\d,]+)", out)
    packed = re.search(r"packed loss on the first 64 rows \(.*\): ([\d.]+) over ([\d,]+)", out)
    assert padded.groups() == packed.groups(), out  # the same loss over the same targets
    shares = [float(m) for m in re.findall(r"([\d.]+)% of positions carry loss", out)]
    assert len(shares) == 2 and shares[1] > shares[0], out  # packing fills the rows
    assert re.search(r"packed / padded: [\d.]+x", out), out


def test_bench_accelerations_times_each_speed_up_on_against_off():
    proc = run_cmd(ROOT, sys.executable, "-m", "bench.accelerations", "--model", "tiny", "--only", "copy,malloc")
    ratios = re.findall(r"^(.*): on ([\d.]+), off ([\d.]+), on/off ([\d.]+)$", proc.stdout, re.M)
    assert [r[0].split(",")[0] for r in ratios] == ["bf16 weight copy", "glibc keeps freed memory"], proc.stdout
    for _, on, off, ratio in ratios:
        assert float(on) > 0 and float(off) > 0 and float(ratio) == pytest.approx(float(on) / float(off), abs=2e-3)


def test_bench_recipes_finds_the_steps_to_adamws_final_loss_and_counts_newton_schulz(tmp_path):
    from bench import recipes
    def write(name, vals):
        save = tmp_path / name / "ckpt.pt"
        save.parent.mkdir()
        with open(recipes.metrics_path(str(save)), "w") as f:
            for step, val in vals:
                f.write(json.dumps({"step": step, "loss": val, "tok_s": 512.0, "val_loss": val}) + "\n")
        return str(save)
    adamw = write("adamw", [(0, 11.0), (50, 6.0), (100, 5.0)])
    muon = write("muon", [(0, 11.0), (50, 5.5), (60, 4.9)])
    result = recipes.report([("AdamW", adamw, 100), ("Muon", muon, 60)])
    assert result["target_val_loss"] == 5.0
    rows = {r["run"]: r for r in result["rows"]}
    assert rows["Muon"]["first_step_at_target"] == 60 and rows["Muon"]["steps_vs_adamw"] == 0.6
    assert rows["Muon"]["tokens_to_target"] == 60 * 1024 and rows["Muon"]["train_seconds_to_target"] == 120.0
    assert rows["AdamW"]["first_step_at_target"] == 100
    flops = recipes.newton_schulz_flops(SmolLM2(PRESETS["smollm2-135m"]))  # docs/training.md's 1.4 TFLOP
    assert 1.3e12 < flops < 1.5e12
