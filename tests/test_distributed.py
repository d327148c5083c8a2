"""DistributedDataParallel on CPU: torchrun with 2 gloo processes is one process with --grad-accum 2.

Rank r reads the window at position + r*B*T of every global batch, and one process with gradient
accumulation reads the same windows in the same order, so the two runs see the same tokens; only
the order of floating-point additions in the all-reduce differs.
"""
import sys

import pytest
import torch

from conftest import (COMPILE_ON_ERRORS, ONE_RANK_CANNOT_COMPILE, ROOT, TINY, TRAIN_PY, load_ckpt, losses,
                      patched_train, run_cmd, run_train)

TINY = TINY + ["--ckpt-interval", "2", "--steps", "4"]  # 2 ranks on 2 cores: one thread each (TRAIN_ENV)


def weights(path):
    return load_ckpt(path)["model"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, corpus):
    """The same 4 steps of 128 tokens twice: 2 ranks x 2 sequences, and 1 process x 2 micro-batches
    of 2 sequences; then the DDP run resumed from its step-2 checkpoint in a single process."""
    folder = tmp_path_factory.mktemp("ddp")
    ddp = run_cmd(folder, sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                  TRAIN_PY, *TINY, "--data", corpus, "--save", "ddp/ckpt.pt", "--metrics", "ddp/metrics.jsonl")
    single = run_train(folder, *TINY, "--data", corpus, "--grad-accum", "2",
                       "--save", "single/ckpt.pt", "--metrics", "single/metrics.jsonl")
    resumed = run_train(folder, "--steps", "4", "--ckpt", "ddp/ckpt_step_2.pt",
                        "--save", "resumed/ckpt.pt", "--metrics", "resumed/metrics.jsonl")
    return folder, ddp, single, resumed


def test_two_ranks_log_once_and_count_every_rank_in_tokens_per_step(runs):
    _, ddp, single, _ = runs
    assert "2 x 32 tokens x 1 micro-steps x 2 processes = 128 tokens per step" in ddp.stdout
    assert "2 x 32 tokens x 2 micro-steps x 1 processes = 128 tokens per step" in single.stdout
    assert ddp.stdout.count("step 4/4") == 1  # rank 0 alone logs


def test_two_ranks_match_one_process_with_grad_accum_2_step_by_step(runs):
    folder = runs[0]
    ddp, single = losses(folder / "ddp/metrics.jsonl"), losses(folder / "single/metrics.jsonl")
    assert list(ddp) == list(single) == [1, 2, 3, 4]
    assert ddp == pytest.approx(single, abs=1e-5, rel=0)
    assert ddp[4] < ddp[1] - 0.3  # and they did train


def test_two_ranks_end_with_the_same_weights_as_one_process(runs):
    folder = runs[0]
    a, b = weights(folder / "ddp/ckpt.pt"), weights(folder / "single/ckpt.pt")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4, msg=k)


def test_a_ddp_checkpoint_resumes_in_one_process_with_the_same_global_batch(runs):
    folder, _, _, resumed = runs
    assert "2 x 32 tokens x 2 micro-steps x 1 processes" in resumed.stdout  # grad-accum 1 x 2 ranks -> 2
    single = losses(folder / "single/metrics.jsonl")
    resumed = losses(folder / "resumed/metrics.jsonl")
    assert list(resumed) == [3, 4]
    assert resumed == pytest.approx({step: single[step] for step in (3, 4)}, abs=1e-5, rel=0)


EXIT_AFTER_ALL_REDUCES = """
import sys
import torch
import torch.distributed as dist
sys.path.insert(0, {root!r})
from smollm2.distributed import exit_process

dist.init_process_group("gloo")
for _ in range(20):
    dist.all_reduce(torch.ones(1))  # Python lets go of the tensor before gloo's thread does
print(f"rank {{dist.get_rank()}} done", end="")  # no newline: exit_process must flush it
exit_process(0)
"""


def test_torchrun_processes_exit_cleanly_right_after_an_all_reduce(tmp_path):
    """With sys.exit in place of exit_process, this aborted (SIGABRT) 7 runs in 10 on a 2-core
    VM: Python's teardown meets a gloo thread still releasing the last all-reduce's tensor. Four
    runs, so a regression fails here with probability about 99%."""
    script = tmp_path / "exit_after_all_reduces.py"
    script.write_text(EXIT_AFTER_ALL_REDUCES.format(root=ROOT))
    for _ in range(4):
        proc = run_cmd(tmp_path, sys.executable, "-m", "torch.distributed.run", "--standalone",
                       "--nproc_per_node=2", script)
        assert "rank 0 done" in proc.stdout and "rank 1 done" in proc.stdout



def test_backends_are_nccl_between_gpus_gloo_between_cpus_and_none_for_several_macs():
    from smollm2.distributed import backend
    from smollm2.errors import UsageError
    assert backend("cuda", 8) == "nccl" and backend("cpu", 2) == "gloo" and backend("mps", 1) == "gloo"
    with pytest.raises(UsageError, match="2 processes on a Mac's GPU"):
        backend("mps", 2)


def test_torchrun_on_a_macs_gpu_is_one_line(tmp_path, monkeypatch):
    """torchrun with 2 processes where mps is the device: one clear line, not gloo's raw error."""
    import train
    from smollm2 import devices
    from smollm2.errors import UsageError
    monkeypatch.setattr(devices, "available_devices", lambda: {"cuda": False, "mps": True, "cpu": True})
    monkeypatch.setattr("smollm2.distributed.available_devices", devices.available_devices)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UsageError, match="mps.*python train.py.*--device cpu"):
        train.main(["--steps", "1", "--save", str(tmp_path / "c.pt")])


# ----------------------------------------------------------------------------- torch.compile under DDP
# torchrun's rank 1 cannot compile (as a node without a C++ compiler); rank 0 "compiles" (torch.compile
# returns the module as it is: no compile time in the test). The ranks must decide together.
def test_a_compile_that_fails_on_one_rank_makes_every_rank_eager_or_stop(tmp_path, corpus):
    script = patched_train(tmp_path, ONE_RANK_CANNOT_COMPILE)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", script]
    proc = run_cmd(tmp_path, *torchrun, *TINY, "--data", corpus, "--steps", 2, "--compile", "auto",
                   "--save", "auto.pt", timeout=300)
    assert "compile: eager: torch.compile failed here (it failed on another rank)" in proc.stdout  # rank 0's log
    assert load_ckpt(tmp_path / "auto.pt")["step"] == 2  # both ranks trained, eagerly, to the end
    proc = run_cmd(tmp_path, *torchrun, *TINY, "--data", corpus, "--steps", 2, "--compile", "on",
                   "--save", "on.pt", status=1, timeout=300)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("train.py: error: ")]
    assert sorted(errors) == sorted(COMPILE_ON_ERRORS)
    assert not (tmp_path / "on.pt").exists()


def test_compiled_ddp_matches_one_compiled_process_with_grad_accum_2(tmp_path, corpus):
    """torch.compile(DDP(loss)), DDP-aware compilation, trains as one compiled process would."""
    args = [*TINY, "--data", corpus, "--steps", 3, "--compile", "on", "--ckpt-interval", 0]
    ddp = run_cmd(tmp_path, sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                  TRAIN_PY, *args, "--save", "ddp/c.pt", timeout=600)
    run_train(tmp_path, *args, "--grad-accum", 2, "--save", "single/c.pt")
    assert "compile: --compile on" in ddp.stdout
    a, b = losses(tmp_path / "ddp/c_metrics.jsonl"), losses(tmp_path / "single/c_metrics.jsonl")
    assert a.keys() == b.keys() == {1, 2, 3}
    assert all(abs(a[s] - b[s]) < 1e-5 for s in a), (a, b)


# ----------------------------------------------------------------------------- Muon under DDP
def test_muon_on_two_ranks_matches_one_process_with_grad_accum_2(tmp_path, corpus):
    """Muon orthogonalises the all-reduced gradient, the same on every rank: DDP trains as one process does."""
    args = [*TINY, "--data", corpus, "--optimizer", "muon", "--schedule", "wsd", "--steps", 4, "--ckpt-interval", 0]
    ddp = run_cmd(tmp_path, sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                  TRAIN_PY, *args, "--save", "ddp/c.pt")
    run_train(tmp_path, *args, "--grad-accum", 2, "--save", "single/c.pt")
    assert "optimizer: Muon" in ddp.stdout
    a, b = losses(tmp_path / "ddp/c_metrics.jsonl"), losses(tmp_path / "single/c_metrics.jsonl")
    assert list(a) == list(b) == [1, 2, 3, 4]
    assert a == pytest.approx(b, abs=1e-4, rel=0) and a[4] < a[1] - 0.05
    wa, wb = weights(tmp_path / "ddp/c.pt"), weights(tmp_path / "single/c.pt")
    for k in wa:  # Newton-Schulz in bf16: a last-bit difference in a gradient may round one step apart
        torch.testing.assert_close(wa[k], wb[k], atol=1e-4, rtol=1e-3, msg=k)
