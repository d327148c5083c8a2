"""--optimizer muon, --schedule wsd and --model CONFIG.JSON (smollm2/optim.py, train_args.model_config):
the parameter groups, the schedules as pure functions, exact resume with Muon across wsd's decay, the
decay moved by a raised --steps, and the one-line refusals."""
import copy
import json
import os
import shutil
from types import SimpleNamespace

import pytest
import torch

from conftest import TINY, TINY_CONFIG, assert_one_line_error, load_ckpt, losses, read_metrics, run_train, tiny_model
from smollm2 import optim
from smollm2.errors import UsageError
from smollm2.train_args import model_config

MUON = ["--optimizer", "muon", "--schedule", "wsd", "--decay-frac", "0.5"]  # 8 steps: flat to 4, decay to 8


def settings(**kw):
    base = dict(optimizer="muon", lr=3e-3, weight_decay=0.1, min_lr=0.0, warmup=0, schedule="wsd",
                decay_frac=0.5, decay_shape="linear", steps=8)
    return SimpleNamespace(**{**base, **kw})


# ----------------------------------------------------------------------------- the parameter groups
@pytest.mark.parametrize("kind", optim.OPTIMIZERS)
def test_every_parameter_is_in_exactly_one_group(kind):
    model = tiny_model()
    groups = optim.param_groups(model, kind, 0.1)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))  # the tied lm_head counted once
    assert set(ids) == {id(p) for p in model.parameters()}
    assert [g["weight_decay"] for g in groups] == [0.1] * (len(groups) - 1) + [0.0]  # vectors: no decay
    assert all(p.dim() < 2 for p in groups[-1]["params"])


def test_muon_takes_every_2d_matrix_of_the_decoder_layers_and_adamw_the_embedding_and_norms():
    model = tiny_model()
    muon, adamw_matrices, adamw_vectors = optim.param_groups(model, "muon", 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    muon_names = sorted(names[id(p)] for p in muon["params"])
    projections = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert muon_names == sorted(f"model.layers.{i}.{part}.{proj}.weight" for i in range(TINY_CONFIG.num_hidden_layers)
                                for part, projs in (("self_attn", projections[:4]), ("mlp", projections[4:]))
                                for proj in projs)
    assert all(p.dim() == 2 for p in muon["params"])
    assert [names[id(p)] for p in adamw_matrices["params"]] == ["model.embed_tokens.weight"]  # = lm_head
    assert all("norm" in names[id(p)] for p in adamw_vectors["params"])


def train_steps(optimizer, model, steps, start=0):
    torch.manual_seed(start)
    for step in range(start, start + steps):
        optim.set_lr(optimizer, optim.lr_at(step, settings(), 8), step)
        x = torch.randint(0, TINY_CONFIG.vocab_size, (2, 16))
        model(x[:, :-1], targets=x[:, 1:])[1].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def test_muon_adamw_is_one_optimizer_whose_state_dict_resumes_bit_for_bit():
    model = tiny_model()
    optimizer = optim.make_optimizer(model, settings(), fused=True)
    assert isinstance(optimizer, optim.MuonAdamW) and isinstance(optimizer.muon, torch.optim.Muon)
    hooked = []
    optimizer.register_step_post_hook(lambda *_: hooked.append(1))  # speedups.LowPrecisionWeights' hook
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_steps(optimizer, model, 3)
    assert len(hooked) == 3 and all(not torch.equal(before[n], p) for n, p in model.named_parameters())
    assert {"momentum_buffer"} <= set(optimizer.state[model.model.layers[0].mlp.up_proj.weight])
    assert {"exp_avg", "exp_avg_sq"} <= set(optimizer.state[model.model.embed_tokens.weight])
    saved_model = {k: v.clone() for k, v in model.state_dict().items()}
    saved_opt = copy.deepcopy(optimizer.state_dict())  # its tensors are the live state: a checkpoint's copy
    train_steps(optimizer, model, 2, start=3)
    again = tiny_model()
    again.load_state_dict(saved_model)
    resumed = optim.make_optimizer(again, settings(), fused=True)
    resumed.load_state_dict(saved_opt)
    assert resumed.muon.state is resumed.state and resumed.muon.param_groups[0] is resumed.param_groups[0]
    train_steps(resumed, again, 2, start=3)
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name


def test_muons_momentum_warms_up_from_0_85_to_0_95_over_300_steps():
    optimizer = optim.make_optimizer(tiny_model(), settings(), fused=True)
    momentum = lambda step: (optim.set_lr(optimizer, 1e-3, step), optimizer.param_groups[0]["momentum"])[1]  # noqa: E731
    assert [momentum(s) for s in (0, 150, 300, 10_000)] == pytest.approx([0.85, 0.90, 0.95, 0.95])
    assert all(g["lr"] == 1e-3 for g in optimizer.param_groups) and "momentum" not in optimizer.param_groups[1]


# ----------------------------------------------------------------------------- the schedules
def test_wsd_warms_up_stays_flat_then_decays_linearly_to_min_lr_over_the_last_decay_frac():
    lr = lambda step, shape="linear": optim.wsd_lr(step, 1.0, 0.1, 10, 100, 0.2, shape)  # noqa: E731
    assert [lr(s) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert all(lr(s) == 1.0 for s in range(10, 80))  # flat: steps 11..80 in the log's counting
    assert lr(80) == pytest.approx(1.0 - 0.9 / 20) and lr(89) == pytest.approx(0.55)  # linear
    assert lr(99) == pytest.approx(0.1) and lr(100) == lr(10**6) == 0.1  # min_lr at the last step, then after
    assert lr(89, "1-sqrt") == pytest.approx(0.1 + 0.9 * (1 - 0.5 ** 0.5))  # below linear half way
    assert all(lr(s, "1-sqrt") < lr(s) for s in range(80, 99))


def test_a_wsd_warmup_longer_than_the_flat_part_decays_from_where_the_warmup_got():
    lrs = [optim.wsd_lr(s, 1.0, 0.0, 10, 10, 0.5) for s in range(10)]  # decay from step 5, warmup to 10
    assert max(lrs) == pytest.approx(0.6) and lrs[-1] == 0.0  # the decay's line caps the warmup's
    assert all(b - a <= 0.1 + 1e-12 for a, b in zip(lrs, lrs[1:]))  # never a jump up to the peak


def test_wsd_moves_its_decay_to_a_new_steps_only_before_the_decay_began():
    ckpt = lambda step: {"lr_horizon": 100, "step": step}  # noqa: E731  decay over steps 81..100
    assert optim.lr_horizon(settings(steps=200, decay_frac=0.2), ckpt(80)) == (200, 100)  # not begun: moved
    assert optim.lr_horizon(settings(steps=200, decay_frac=0.2), ckpt(81)) == (100, None)  # begun: kept
    assert optim.lr_horizon(settings(steps=100, decay_frac=0.2), ckpt(50)) == (100, None)
    assert optim.lr_horizon(settings(steps=200, schedule="cosine"), ckpt(10)) == (100, None)  # cosine: kept
    assert optim.lr_horizon(settings(steps=200), None) == (200, None)  # a new run


# ----------------------------------------------------------------------------- --model CONFIG.JSON
SMALL = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_act": "silu", "vocab_size": 49152,
         "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "max_position_embeddings": 256, "tie_word_embeddings": True}


def write_config(folder, **changes):
    path = folder / "config.json"
    path.write_text(json.dumps({k: v for k, v in {**SMALL, **changes}.items() if v is not ...}))
    return str(path)


def test_a_config_json_gives_its_shape_and_hf_llamas_defaults_for_what_it_leaves_out(tmp_path):
    config = model_config(write_config(tmp_path, num_key_value_heads=..., max_position_embeddings=...))
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (64, 128, 2)
    assert config.num_key_value_heads == 4 and config.max_position_embeddings == 2048  # HF's defaults
    assert config.rope_theta == 10000.0 and config.rms_norm_eps == 1e-6 and config.bos_token_id == 0
    assert model_config("tiny").hidden_size == 96  # the presets as before


@pytest.mark.parametrize("field, value", [
    ("attention_bias", True), ("mlp_bias", True), ("rope_scaling", {"rope_type": "linear", "factor": 2.0}),
    ("tie_word_embeddings", False), ("hidden_act", "gelu"), ("model_type", "mistral"), ("head_dim", 32),
    ("attention_dropout", 0.1), ("hidden_size", ...), ("vocab_size", 32000),
    ("num_key_value_heads", 3),  # the model's own check: "4 query heads do not split into 3 key/value groups"
])
def test_what_model_py_does_not_implement_is_refused_naming_the_field(tmp_path, field, value):
    with pytest.raises(UsageError, match=field if field != "num_key_value_heads" else "3 key/value groups"):
        model_config(write_config(tmp_path, **{field: value}))


def test_a_bad_config_json_is_one_line_and_exit_status_2(tmp_path):
    bad = write_config(tmp_path, mlp_bias=True)
    assert_one_line_error(run_train(tmp_path, "--model", bad, "--steps", 2, status=2), "train.py", "mlp_bias")
    proc = run_train(tmp_path, "--model", "smollm2-7b", "--steps", 2, status=2)
    assert_one_line_error(proc, "train.py", "not a preset", "tiny")


def test_a_config_json_model_trains_and_its_shape_is_saved_and_resumed(tmp_path, corpus):
    path = write_config(tmp_path)
    proc = run_train(tmp_path, *TINY, "--model", path, "--data", corpus, "--steps", 2)
    assert "2 layers, hidden 64, heads 4/2 kv, mlp 128" in proc.stdout
    ckpt = load_ckpt(tmp_path / "checkpoint.pt")
    assert (ckpt["config"]["hidden_size"], ckpt["config"]["num_key_value_heads"]) == (64, 2)
    os.remove(path)  # a resume reads the shape from the checkpoint, not from the file
    run_train(tmp_path, "--steps", 3, "--ckpt", "checkpoint.pt")
    assert load_ckpt(tmp_path / "checkpoint.pt")["step"] == 3


# ----------------------------------------------------------------------------- train.py with Muon and wsd
@pytest.fixture(scope="module")
def muon_run(tmp_path_factory, corpus):
    """8 steps of Muon + wsd (flat to step 4, decay to 8) with a checkpoint every 2 steps."""
    folder = tmp_path_factory.mktemp("muon")
    proc = run_train(folder, *TINY, *MUON, "--data", corpus, "--steps", 8, "--ckpt-interval", 2, "--keep-last", 0,
                     "--save", "full/ckpt.pt")
    return folder, proc


def test_a_muon_wsd_run_says_its_optimizer_and_schedule_in_words(muon_run):
    _, proc = muon_run
    assert "optimizer: Muon (Nesterov momentum 0.85 -> 0.95 over 300 steps" in proc.stdout
    assert ("LR: warmup 2 steps to 0.003, flat until step 4, then a linear decay over the last 50% of the steps to "
            "3e-05 at step 8 (the horizon set by this run's first launch), 3e-05 after it") in proc.stdout


def test_muon_resumes_bit_for_bit_across_the_start_of_the_wsd_decay(muon_run):
    folder, _ = muon_run
    run_train(folder, "--steps", 8, "--ckpt", "full/ckpt_step_2.pt", "--save", "resumed/ckpt.pt")
    full, resumed = losses(folder / "full/ckpt_metrics.jsonl"), losses(folder / "resumed/ckpt_metrics.jsonl")
    assert sorted(resumed) == list(range(3, 9))
    assert [resumed[s] for s in resumed] == [full[s] for s in resumed]  # exact float equality
    a, b = load_ckpt(folder / "full/ckpt.pt"), load_ckpt(folder / "resumed/ckpt.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["args"]["optimizer"] == b["args"]["optimizer"] == "muon"
    lrs = [r["lr"] for r in read_metrics(folder / "full/ckpt_metrics.jsonl")]
    assert lrs[1:4] == [3e-3] * 3 and lrs[4] < 3e-3 and lrs[-1] == pytest.approx(3e-5)


def test_a_raised_steps_before_the_decay_moves_it_to_the_new_end_and_says_so(muon_run, tmp_path):
    folder, _ = muon_run
    proc = run_train(folder, "--steps", 12, "--ckpt", "full/ckpt_step_4.pt", "--save", "moved/ckpt.pt")
    assert ("wsd: the decay moved to the end of --steps 12: the checkpoint's run (step 4) was to decay from step 4 "
            "to 8, and had not begun") in proc.stdout
    lrs = {r["step"]: r["lr"] for r in read_metrics(folder / "moved/ckpt_metrics.jsonl")}
    assert [lrs[s] for s in (5, 6)] == [3e-3, 3e-3] and lrs[7] < 3e-3 and lrs[12] == pytest.approx(3e-5)
    assert load_ckpt(folder / "moved/ckpt.pt")["lr_horizon"] == 12


def test_once_the_decay_began_the_horizon_stays(muon_run):
    folder, _ = muon_run
    proc = run_train(folder, "--steps", 10, "--ckpt", "full/ckpt_step_6.pt", "--save", "kept/ckpt.pt")
    assert "wsd: the decay moved" not in proc.stdout and "steps 9..10 are past the horizon" in proc.stdout
    full, kept = losses(folder / "full/ckpt_metrics.jsonl"), losses(folder / "kept/ckpt_metrics.jsonl")
    assert [kept[s] for s in (7, 8)] == [full[s] for s in (7, 8)]


def test_resuming_with_another_optimizer_is_one_line_and_leaves_the_checkpoint_alone(muon_run):
    folder, _ = muon_run
    before = (folder / "full/ckpt.pt").read_bytes()
    proc = run_train(folder, "--steps", 9, "--ckpt", "full/ckpt.pt", "--save", "full/ckpt.pt", "--optimizer", "adamw",
                     status=2)
    assert_one_line_error(proc, "train.py", "--optimizer muon", "trained with")
    assert (folder / "full/ckpt.pt").read_bytes() == before


def test_fsdp_with_muon_and_a_decay_frac_over_1_are_refused_in_one_line_saying_why(tmp_path):
    proc = run_train(tmp_path, *TINY, "--optimizer", "muon", "--fsdp", "--steps", 2, status=2)
    assert_one_line_error(proc, "train.py", "--fsdp --optimizer muon", "whole matrices")
    proc = run_train(tmp_path, *TINY, "--schedule", "wsd", "--decay-frac", "1.5", "--steps", 2, status=2)
    assert_one_line_error(proc, "train.py", "--decay-frac 1.5", "at most 1")


def test_a_checkpoint_from_before_these_settings_resumes_as_adamw_and_cosine(tmp_path, corpus):
    run_train(tmp_path, *TINY, "--data", corpus, "--steps", 2, "--lr", 1e-3)
    ckpt = load_ckpt(tmp_path / "checkpoint.pt")
    for k in ("optimizer", "schedule", "decay_frac", "decay_shape"):
        del ckpt["args"][k]
    torch.save(ckpt, tmp_path / "old.pt")
    shutil.copy(tmp_path / "old.pt", tmp_path / "resume.pt")
    proc = run_train(tmp_path, "--steps", 3, "--ckpt", "resume.pt", "--save", "resume.pt")
    assert "optimizer: AdamW (0.9, 0.95)" in proc.stdout and "cosine to 3e-05 at step 2" in proc.stdout
    assert "LR: warmup 2 steps to 0.001" in proc.stdout  # its own --lr, not Muon's nor AdamW's default
    assert load_ckpt(tmp_path / "resume.pt")["args"]["optimizer"] == "adamw"
