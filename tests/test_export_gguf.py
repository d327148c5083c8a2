"""GGUF export (export.py via train.py --export SRC OUT.gguf): transformers' GGUF loader, the
independent oracle, reads the real SmolLM2 weights back to the same logits and the same
tokenizer; our loader reads them back unchanged; F16, BF16 and Q8_0 files of a trained tiny
checkpoint give the logits of the weights rounded to that type."""
import os

import numpy as np
import pytest
import torch

from conftest import run_cmd, run_train, ROOT
from model import SmolLM2

TRICKY = ["<|im_start|>user\nHi there!<|im_end|>\n<|im_start|>assistant\n",
          "  two spaces,    four spaces\tand a tab\n\n\nthree newlines",
          "Digits 1234567890 and 3.14159, 1e-5, 2026-12-01",
          "Accents: café, naïve, Ångström, señor, über", "Emoji: 🤗🚀 👩‍💻 ✨ and CJK 你好世界",
          "<|endoftext|>after the end"]


@pytest.fixture(scope="module")
def real_export(tmp_path_factory, gguf_path):
    """The real SmolLM2-135M-Instruct weights written back out as an F32 GGUF (once per module)."""
    folder = tmp_path_factory.mktemp("real_gguf")
    run_train(folder, "--export", gguf_path, folder / "real-f32.gguf", "--dtype", "fp32")
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
    if dtype == "bf16":  # through train.py's CLI; the others through export.py's (q8_0 is not a train dtype)
        proc = run_train(tmp_path, "--export", tiny_checkpoint, out, "--dtype", dtype)
    else:
        proc = run_cmd(tmp_path, "python", os.path.join(ROOT, "export.py"), tiny_checkpoint, out, "--dtype", dtype)
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
        from export import llama_cpp_qk
        wrong = SmolLM2.from_pretrained(out).eval()
        q = wrong.model.layers[0].self_attn.q_proj.weight
        q.copy_(torch.from_numpy(llama_cpp_qk(q.numpy(), wrong.config.num_attention_heads)))
        assert (wrong(ids)[0] - expected).abs().max() > 100 * 2e-5


def test_a_bad_export_dtype_is_one_line_and_exit_2(tmp_path, tiny_checkpoint):
    proc = run_cmd(tmp_path, "python", os.path.join(ROOT, "export.py"), tiny_checkpoint, tmp_path / "x.gguf",
                   "--dtype", "int4", status=2)
    assert proc.stderr.startswith("export.py: error: --export: --dtype int4") and len(proc.stderr.splitlines()) == 1
    proc = run_cmd(tmp_path, "python", os.path.join(ROOT, "export.py"), tiny_checkpoint, tmp_path / "hf",
                   "--dtype", "q8_0", status=2)
    assert "GGUF only" in proc.stderr and not (tmp_path / "hf").exists() and not (tmp_path / "x.gguf").exists()
