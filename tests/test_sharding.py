"""FSDP2 (smollm2/sharding.py) and sharded checkpoints (smollm2/checkpoint.py), on CPU ranks with gloo:
torchrun with 2 processes and --fsdp trains as one process with --grad-accum 2, its sharded checkpoints
resume exactly under 2 ranks and under 1 (DCP reshards), a kill during a save keeps the previous
checkpoint, and eval.py and export.py gather a sharded checkpoint into a model transformers reads."""
import os
import sys

import pytest
import torch

from conftest import (COMPILE_ON_ERRORS, ONE_RANK_CANNOT_COMPILE, ROOT, TINY, TRAIN_PY, assert_one_line_error,
                      load_ckpt, losses, patched_train, read_metrics, run_cmd, run_train)

TINY = TINY + ["--steps", "4", "--ckpt-interval", "2", "--eval-interval", "2", "--eval-iters", "3"]


def torchrun(n, *args):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", *args]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, corpus):
    """4 steps of 2 ranks x 2 sequences sharded, and of 1 process x 2 micro-batches; the sharded run
    resumed from its step-2 checkpoint under 2 ranks and under 1."""
    folder = tmp_path_factory.mktemp("fsdp")
    data = ["--data", corpus]
    sharded = run_cmd(folder, *torchrun(2, TRAIN_PY, *TINY, *data, "--fsdp", "--save", "fsdp/c.pt",
                                        "--eval-tasks", "openbook_qa:4"))
    run_train(folder, *TINY, *data, "--grad-accum", 2, "--save", "single/c.pt")
    run_cmd(folder, *torchrun(2, TRAIN_PY, *TINY, *data, "--fsdp", "--ckpt", "fsdp/c_step_2.pt", "--save", "two/c.pt"))
    one = run_cmd(folder, *torchrun(1, TRAIN_PY, *TINY, *data, "--fsdp", "--ckpt", "fsdp/c_step_2.pt",
                                    "--save", "one/c.pt"))
    return folder, sharded, one


def test_two_sharded_ranks_match_one_process_with_grad_accum_2_step_by_step(runs):
    folder, sharded, _ = runs
    a, b = losses(folder / "fsdp/c_metrics.jsonl"), losses(folder / "single/c_metrics.jsonl")
    assert a.keys() == b.keys() == {1, 2, 3, 4}
    assert all(abs(a[s] - b[s]) < 1e-5 for s in a), (a, b)
    assert "sharded over 2 processes" in sharded.stdout and sharded.stdout.count("step 4/4") == 1  # rank 0 logs
    assert [r.get("acc_openbook_qa") is not None for r in read_metrics(folder / "fsdp/c_metrics.jsonl")] == [
        False, True, False, True]  # --eval-tasks under FSDP: every rank scores, in step


def test_eval_tasks_split_over_sharded_ranks_on_a_new_run_without_validation_score_as_one_process(tmp_path, corpus):
    """FSDP2 takes the first module to run forward as its root: scored tasks that ran first (no
    validation set, a new run) once made a decoder layer the root, and the next forward failed."""
    args = [*TINY, "--data", corpus, "--val-frac", "0", "--eval-tasks", "arc_easy:24", "--steps", "2",
            "--compile", "off"]
    sharded = run_cmd(tmp_path, *torchrun(2, TRAIN_PY, *args, "--fsdp", "--save", "fsdp/c.pt"), timeout=300)
    one = run_train(tmp_path, *args, "--grad-accum", 2, "--save", "one/c.pt")
    start = [next(line for line in proc.stdout.splitlines() if line.startswith("step 0 | arc_easy "))
             for proc in (sharded, one)]
    assert start[0] == start[1]  # the same initial weights: the same answers to the 24 rows
    assert [r["step"] for r in read_metrics(tmp_path / "fsdp/c_metrics.jsonl") if "acc_arc_easy" in r] == [2]


def test_a_sharded_checkpoint_is_a_folder_of_shards_and_the_train_state_and_old_ones_are_pruned(runs):
    folder = runs[0] / "fsdp"
    assert sorted(os.listdir(folder / "c.pt")) == [".metadata", "__0_0.distcp", "__1_0.distcp", "train_state.pt"]
    assert {"c_step_2.pt", "c_step_4.pt", "c_best.pt"} <= set(os.listdir(folder))
    assert not [n for n in os.listdir(folder) if n.endswith((".tmp", ".old"))]


def test_resuming_on_the_same_world_size_repeats_the_uninterrupted_run(runs):
    folder = runs[0]
    whole, resumed = losses(folder / "fsdp/c_metrics.jsonl"), losses(folder / "two/c_metrics.jsonl")
    assert resumed == {s: v for s, v in whole.items() if s > 2}


def test_a_two_rank_checkpoint_resumes_on_one_rank_resharded(runs):
    folder, _, one = runs
    whole, resumed = losses(folder / "fsdp/c_metrics.jsonl"), losses(folder / "one/c_metrics.jsonl")
    assert resumed.keys() == {3, 4} and all(abs(resumed[s] - whole[s]) < 1e-5 for s in resumed)
    assert "was sharded over 2 processes, this run has 1: DCP reshards it" in one.stdout
    assert load_ckpt(folder / "one/c.pt/train_state.pt")["args"]["grad_accum"] == 2  # the same global batch


def test_export_and_eval_gather_a_sharded_checkpoint_that_transformers_reads_with_the_same_logits(runs):
    from transformers import AutoModelForCausalLM
    from model import SmolLM2
    folder = runs[0]
    run_cmd(folder, sys.executable, os.path.join(ROOT, "export.py"), "fsdp/c.pt", "hf", "--dtype", "fp32")
    ours = SmolLM2.from_pretrained(str(folder / "fsdp/c.pt")).eval()
    single = load_ckpt(folder / "single/c.pt")["model"]  # the same training in one process
    assert all(torch.allclose(ours.state_dict()[k], v, atol=1e-5) for k, v in single.items())
    theirs = AutoModelForCausalLM.from_pretrained(folder / "hf", dtype=torch.float32).eval()
    idx = torch.randint(0, ours.config.vocab_size, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx)[0], theirs(idx).logits, rtol=1e-4, atol=1e-4)
    proc = run_cmd(folder, sys.executable, os.path.join(ROOT, "eval.py"), "fsdp/c.pt", "--data",
                   os.path.join(ROOT, "input.txt"), "--seq-len", "32", "--max-tokens", "2000")
    assert proc.stdout.startswith("fsdp/c.pt on ") and "warning" not in proc.stderr.lower()


# rank 1 is killed (SIGKILL) as it starts writing its shards of the step-4 checkpoint
KILL_DURING_SAVE = """
import os, signal
import torch.distributed.checkpoint as dcp
real, calls = dcp.save, [0]
def save(*args, **kwargs):
    calls[0] += 1
    if calls[0] == 2 and os.environ["RANK"] == "1":
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args, **kwargs)
dcp.save = save
"""


def test_a_rank_killed_during_a_sharded_save_costs_only_the_steps_since_the_last_checkpoint(tmp_path, corpus):
    script = patched_train(tmp_path, KILL_DURING_SAVE)
    args = [*TINY, "--data", corpus, "--fsdp", "--eval-interval", "1000", "--steps", "6", "--ckpt", "auto",
            "--save", "run/c.pt"]
    run_cmd(tmp_path, *torchrun(2, script, *args), status=1, timeout=300)  # torchrun: a worker died
    assert sorted(n for n in os.listdir(tmp_path / "run") if n.endswith(".pt")) == ["c_step_2.pt"]
    proc = run_cmd(tmp_path, *torchrun(2, TRAIN_PY, *args), timeout=300)  # the same command, again
    assert "--ckpt auto: resuming from run/c_step_2.pt at step 2" in proc.stdout
    assert load_ckpt(tmp_path / "run/c.pt/train_state.pt")["step"] == 6
    assert not [n for n in os.listdir(tmp_path / "run") if n.endswith(".tmp")]


def test_a_compile_that_fails_on_one_sharded_rank_makes_every_rank_eager_or_stop(tmp_path, corpus):
    """FSDP's compile probe gathers weights from every rank, so a rank whose compile failed before
    it would leave the others waiting: the ranks agree on a compile with no collective first."""
    script = patched_train(tmp_path, ONE_RANK_CANNOT_COMPILE)
    args = [*TINY, "--data", corpus, "--fsdp", "--steps", "2", "--ckpt-interval", "0", "--eval-interval", "1000"]
    proc = run_cmd(tmp_path, *torchrun(2, script, *args, "--compile", "auto", "--save", "auto.pt"), timeout=300)
    assert "compile: eager: torch.compile failed here (it failed on another rank)" in proc.stdout  # rank 0's log
    assert load_ckpt(tmp_path / "auto.pt/train_state.pt")["step"] == 2  # both ranks trained, eagerly
    proc = run_cmd(tmp_path, *torchrun(2, script, *args, "--compile", "on", "--save", "on.pt"), status=1, timeout=300)
    assert sorted(line for line in proc.stderr.splitlines() if line.startswith("train.py: error: ")) == \
        sorted(COMPILE_ON_ERRORS)
    assert not (tmp_path / "on.pt").exists()


def test_gradient_checkpointing_and_compile_compose_with_fsdp_and_init_loads_into_a_sharded_model(runs):
    """--init from an HF directory (the exported run) into the sharded model, trained with
    --gradient-checkpointing and --compile on: the same losses as the eager plain sharded run."""
    folder = runs[0]
    if not (folder / "hf").exists():
        run_cmd(folder, sys.executable, os.path.join(ROOT, "export.py"), "fsdp/c.pt", "hf", "--dtype", "fp32")
    args = [*TINY, "--data", os.path.join(ROOT, "input.txt"), "--fsdp", "--init", "hf", "--steps", "2",
            "--ckpt-interval", "0"]
    run_cmd(folder, *torchrun(2, TRAIN_PY, *args, "--save", "init/c.pt"), timeout=300)
    proc = run_cmd(folder, *torchrun(2, TRAIN_PY, *args, "--gradient-checkpointing", "--compile", "on",
                                     "--save", "both/c.pt"), timeout=600)
    assert "compile: --compile on" in proc.stdout and "gradient checkpointing" in proc.stdout
    plain, both = losses(folder / "init/c_metrics.jsonl"), losses(folder / "both/c_metrics.jsonl")
    assert plain.keys() == both.keys() == {1, 2} and all(abs(plain[s] - both[s]) < 1e-4 for s in plain)
    assert plain[1] < 10  # trained weights, not a fresh init (about 10.8 at step 1)


def test_fsdp_without_torchrun_and_checkpoints_of_the_other_kind_are_one_line(runs, tmp_path, corpus):
    folder = runs[0]
    proc = run_train(tmp_path, *TINY, "--data", corpus, "--fsdp", status=2)
    assert_one_line_error(proc, "train.py", "--fsdp", "torchrun --nproc_per_node=2 train.py --fsdp")
    proc = run_train(folder, "--ckpt", "fsdp/c.pt", "--steps", 6, status=2)
    assert_one_line_error(proc, "train.py", "fsdp/c.pt", "sharded checkpoint", "--fsdp")
    proc = run_cmd(folder, *torchrun(1, TRAIN_PY, "--fsdp", "--ckpt", "single/c.pt", "--steps", 6), status=1)
    assert ("train.py: error: --ckpt single/c.pt: a single-file checkpoint, and --fsdp resumes sharded ones "
            "(folders); resume it without --fsdp, or start a sharded run from its weights with --init "
            "single/c.pt") in proc.stderr.splitlines()
    assert os.path.isfile(folder / "single/c.pt") and os.path.isdir(folder / "fsdp/c.pt")  # nothing touched
