"""smollm2/weights.py. Writing GGUF (export.py SRC OUT.gguf): transformers' GGUF
loader, the independent oracle, reads the real SmolLM2 weights back to the same logits and the same
tokenizer; our loader reads them back unchanged; F16, BF16 and Q8_0 files of a trained tiny
checkpoint give the logits of the weights rounded to that type. Reading: the real GGUF's config, a
bf16 directory, a training checkpoint, a hub id, and every bad source as a ModelLoadError that says
what was wrong."""
import os
from dataclasses import asdict

import numpy as np
import pytest
import torch

from conftest import run_export, run_train, ROOT
from conftest import TINY_CONFIG as TINY, tiny_model
from model import SmolLM2
from smollm2.weights import ModelLoadError, hf_config_dict, llama_cpp_qk

# A random tiny config that keeps the real model's 3:1 GQA layout (and everything else but size).

TRICKY = ["<|im_start|>user\nHi there!<|im_end|>\n<|im_start|>assistant\n",
          "  two spaces,    four spaces\tand a tab\n\n\nthree newlines",
          "Digits 1234567890 and 3.14159, 1e-5, 2026-12-01",
          "Accents: café, naïve, Ångström, señor, über", "Emoji: 🤗🚀 👩‍💻 ✨ and CJK 你好世界",
          "<|endoftext|>after the end"]


@pytest.fixture(scope="module")
def real_export(tmp_path_factory, gguf_path):
    """The real SmolLM2-135M-Instruct weights written back out as an F32 GGUF (once per module)."""
    folder = tmp_path_factory.mktemp("real_gguf")
    run_export(folder, gguf_path, folder / "real-f32.gguf", "--dtype", "fp32")
    return folder / "real-f32.gguf"


@pytest.mark.slow
def test_real_export_has_the_llama_cpp_layout(real_export):
    import gguf
    reader = gguf.GGUFReader(real_export)
    meta = {k: f.contents() for k, f in reader.fields.items()}
    assert meta["general.architecture"] == "llama" and meta["llama.block_count"] == 30
    assert meta["llama.attention.head_count"] == 9 and meta["llama.attention.head_count_kv"] == 3
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "smollm"
    assert len(meta["tokenizer.ggml.tokens"]) == 49152 and len(meta["tokenizer.ggml.merges"]) > 40000
    assert "<|im_start|>" in meta["tokenizer.chat_template"]
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"]) == (1, 2)  # the model's
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert "output.weight" not in types and types["token_embd.weight"] == "F32"
    assert types["blk.0.attn_norm.weight"] == "F32" and len(types) == 1 + 30 * 9 + 1


@pytest.mark.slow
def test_real_export_gives_transformers_the_logits_of_the_original_file(real_export, hf_real_model):
    from transformers import AutoModelForCausalLM
    exported = AutoModelForCausalLM.from_pretrained(real_export.parent, gguf_file=real_export.name,
                                                    dtype=torch.float32).eval()
    ids = torch.tensor([[504, 3458, 282, 4649, 314, 1345, 30, 216, 1, 9690, 198, 2]])
    with torch.no_grad():
        got, expected = exported(ids).logits, hf_real_model(ids).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_real_export_tokenizer_encodes_tricky_text_like_tokenizer_json(real_export):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer
    ours = Tokenizer.from_file(os.path.join(ROOT, "tokenizer", "tokenizer.json"))
    theirs = AutoTokenizer.from_pretrained(real_export.parent, gguf_file=real_export.name)
    for text in TRICKY:
        expected = ours.encode(text, add_special_tokens=False).ids
        assert theirs.encode(text, add_special_tokens=False) == expected, text
        assert theirs.decode(expected) == text
    assert theirs.convert_tokens_to_ids("<|im_start|>") == 1


@pytest.mark.slow
def test_real_export_reads_back_into_our_model_identically(real_export, real_model):
    back = SmolLM2.from_pretrained(real_export)
    assert back.config == real_model.config
    for name, tensor in real_model.state_dict().items():
        assert torch.equal(back.state_dict()[name], tensor), name


def test_gguf_loader_reads_the_real_config(real_model):
    cfg = real_model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (576, 30, 9, 3)
    assert (cfg.vocab_size, cfg.intermediate_size, cfg.rope_theta) == (49152, 1536, 100000.0)
    assert sum(p.numel() for p in real_model.parameters()) == 134_515_008
    assert real_model.lm_head.weight is real_model.model.embed_tokens.weight
    assert real_model.source_info["format"] == "gguf"


# ----------------------------------------------------------------------------- tiny, other dtypes
@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, corpus):
    """A tiny model trained 3 steps, with q/k/v rows scaled up so that attention is far from
    uniform: a missing or wrong Q/K permutation then moves the logits well past the tolerances."""
    folder = tmp_path_factory.mktemp("tiny_gguf")
    run_train(folder, "--model", "tiny", "--data", corpus, "--steps", 3, "--batch-size", 2, "--seq-len", 32,
              "--eval-iters", 1, "--sample-interval", 0, "--ckpt-interval", 0)
    ckpt = torch.load(folder / "checkpoint.pt", map_location="cpu", weights_only=True)
    for name, t in ckpt["model"].items():
        if "q_proj" in name or "k_proj" in name:
            t.mul_(4.0)
    torch.save(ckpt, folder / "checkpoint.pt")
    return folder / "checkpoint.pt"


def rounded(model, ggml_type):
    """The model with every matrix rounded as the GGUF stores it (norms stay F32)."""
    import gguf
    qtype = getattr(gguf.GGMLQuantizationType, ggml_type)
    state = {}
    for k, v in model.state_dict().items():
        if v.dim() == 2 and ggml_type == "F16":
            v = v.half().float()
        elif v.dim() == 2 and ggml_type == "BF16":
            v = v.bfloat16().float()
        elif v.dim() == 2:  # Q8_0: gguf's own round trip, independent of our export code
            q = gguf.quants.quantize(v.numpy(), qtype)
            v = torch.from_numpy(np.array(gguf.quants.dequantize(q, qtype), dtype=np.float32)).reshape(v.shape)
        state[k] = v
    model.load_state_dict(state)
    return model


@pytest.mark.parametrize("dtype, ggml_type", [("bf16", "BF16"), ("f16", "F16"), ("q8_0", "Q8_0")])
def test_tiny_checkpoint_exports_in_that_dtype_and_reloads_within_its_rounding(tmp_path, tiny_checkpoint,
                                                                               dtype, ggml_type):
    import gguf
    from transformers import AutoModelForCausalLM
    out = tmp_path / f"tiny-{dtype}.gguf"
    proc = run_export(tmp_path, tiny_checkpoint, out, "--dtype", dtype)
    assert f"GGUF {ggml_type}" in proc.stdout and "step 3" in proc.stdout
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(out).tensors}
    assert types["blk.1.ffn_down.weight"] == ggml_type and types["output_norm.weight"] == "F32"
    reference = rounded(SmolLM2.from_pretrained(tiny_checkpoint), ggml_type).eval()
    ids = torch.randint(0, 49152, (2, 40), generator=torch.Generator().manual_seed(0))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32).eval()
    ours = SmolLM2.from_pretrained(out).eval()
    with torch.no_grad():
        expected = reference(ids)[0]
        torch.testing.assert_close(hf(ids).logits, expected, atol=2e-5, rtol=0)
        torch.testing.assert_close(ours(ids)[0], expected, atol=2e-5, rtol=0)
        # the tolerance is tight enough to see a skipped permutation: swap q's rotary halves
        wrong = SmolLM2.from_pretrained(out).eval()
        q = wrong.model.layers[0].self_attn.q_proj.weight
        q.copy_(torch.from_numpy(llama_cpp_qk(q.numpy(), wrong.config.num_attention_heads)))
        assert (wrong(ids)[0] - expected).abs().max() > 100 * 2e-5


# ----------------------------------------------------------------------------- HF directories
@pytest.mark.slow
def test_an_exported_folder_names_one_eos_and_bos_the_models_own_for_transformers(tmp_path, real_model):
    """The Instruct model ends turns with <|im_end|> (id 2): transformers' tokenizer, config and
    generation config read from the folder must all say so, not the tokenizer's <|endoftext|>."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig
    real_model.save_pretrained(tmp_path / "real", dtype=torch.bfloat16)
    tok, config = AutoTokenizer.from_pretrained(tmp_path / "real"), AutoConfig.from_pretrained(tmp_path / "real")
    generation = GenerationConfig.from_pretrained(tmp_path / "real")
    assert real_model.config.eos_token_id == 2 and tok.eos_token == "<|im_end|>"
    assert tok.eos_token_id == config.eos_token_id == generation.eos_token_id == 2
    assert tok.bos_token_id == config.bos_token_id == generation.bos_token_id == 1
    assert tok.unk_token == "<|endoftext|>" and "<|im_start|>" in tok.chat_template  # the rest as copied
    tiny_model().save_pretrained(tmp_path / "tiny")  # a base model: <|endoftext|> (id 0) for both
    tok, config = AutoTokenizer.from_pretrained(tmp_path / "tiny"), AutoConfig.from_pretrained(tmp_path / "tiny")
    assert tok.eos_token == tok.bos_token == "<|endoftext|>" and tok.eos_token_id == config.eos_token_id == 0


# ----------------------------------------------------------------------------- loading
def test_bf16_save_and_training_checkpoint_load(tmp_path):
    ours = tiny_model()
    ours.save_pretrained(tmp_path / "bf16", dtype=torch.bfloat16, tokenizer_dir=None)
    loaded = SmolLM2.from_pretrained(tmp_path / "bf16")
    torch.testing.assert_close(loaded.lm_head.weight, ours.lm_head.weight.to(torch.bfloat16).float())
    ckpt = {"model": ours.state_dict(), "config": asdict(TINY), "step": 7, "val_loss": 3.5,
            "optimizer": {"state": {}, "param_groups": []}}
    torch.save(ckpt, tmp_path / "checkpoint.pt")
    loaded = SmolLM2.from_pretrained(tmp_path / "checkpoint.pt")
    assert loaded.source_info["step"] == 7 and loaded.source_info["val_loss"] == 3.5
    torch.testing.assert_close(loaded.state_dict(), ours.state_dict())


def test_hub_id_goes_through_huggingface_hub(tmp_path, monkeypatch):
    import huggingface_hub
    ours = tiny_model()
    ours.save_pretrained(tmp_path, tokenizer_dir=None)
    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append(repo_id)
        return str(tmp_path)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    loaded = SmolLM2.from_pretrained("HuggingFaceTB/SmolLM2-135M")
    assert calls == ["HuggingFaceTB/SmolLM2-135M"]
    torch.testing.assert_close(loaded.state_dict(), ours.state_dict())


def test_hub_failure_is_a_clear_error(monkeypatch):
    import huggingface_hub

    def offline(repo_id, **kwargs):
        raise OSError("network is unreachable")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(ModelLoadError, match="could not download.*network is unreachable"):
        SmolLM2.from_pretrained("HuggingFaceTB/SmolLM2-135M")


# ----------------------------------------------------------------------------- bad input
def test_missing_path_says_what_was_expected(tmp_path):
    with pytest.raises(ModelLoadError, match="no such file.*expected an HF model directory"):
        SmolLM2.from_pretrained(tmp_path / "nope")
    with pytest.raises(ModelLoadError, match="no config.json"):
        SmolLM2.from_pretrained(tmp_path)  # an existing directory without a model


def test_file_that_is_not_a_model(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello, I am not a model\n")
    with pytest.raises(ModelLoadError, match="not a model file"):
        SmolLM2.from_pretrained(path)
    bogus = tmp_path / "bogus.pt"
    torch.save({"hello": torch.zeros(1)}, bogus)
    with pytest.raises(ModelLoadError, match="not a readable training checkpoint"):
        SmolLM2.from_pretrained(bogus)


def test_truncated_safetensors(tmp_path):
    ours = tiny_model()
    ours.save_pretrained(tmp_path, tokenizer_dir=None)
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    with pytest.raises(ModelLoadError, match="truncated or corrupt"):
        SmolLM2.from_pretrained(tmp_path)


def test_weights_whose_shapes_do_not_match_the_config(tmp_path):
    ours = tiny_model()
    ours.save_pretrained(tmp_path, tokenizer_dir=None)
    hf = hf_config_dict(TINY)
    hf["intermediate_size"] = 200  # the config now disagrees with the stored MLP weights
    import json
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ModelLoadError, match=r"weights do not match the config: .*mlp.*\(160, 96\) but the config expects \(200, 96\)"):
        SmolLM2.from_pretrained(tmp_path)


def test_unsupported_architecture_is_named(tmp_path):
    ours = tiny_model()
    ours.save_pretrained(tmp_path, tokenizer_dir=None)
    import json
    hf = hf_config_dict(TINY) | {"attention_bias": True}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ModelLoadError, match="unsupported config.*attention_bias"):
        SmolLM2.from_pretrained(tmp_path)
