"""SmolLM2 weights in and out: an HF model directory (what transformers loads), a .safetensors,
llama.cpp .gguf or training-checkpoint .pt file, or a hub id. model.py's SmolLM2.from_pretrained and
save_pretrained call these; every failure is a ModelLoadError whose message says what was wrong
and what was expected (train.py, eval.py, export.py and the Space print it as one line).
"""
import json
import os
import re
from dataclasses import asdict, fields

import torch

from model import SmolLM2Config


def save_pretrained(model, out_dir, dtype=None, tokenizer_dir=None):
    """Write config.json, model.safetensors, generation_config.json and tokenizer_dir's files (if
    given): a directory that transformers' AutoModelForCausalLM.from_pretrained loads."""
    from safetensors.torch import save_file
    os.makedirs(out_dir, exist_ok=True)
    dtype = dtype or model.lm_head.weight.dtype
    # the tied lm_head is not stored (safetensors refuses shared tensors; HF re-ties it)
    state = {k: v.detach().to("cpu", dtype).contiguous() for k, v in model.state_dict().items()
             if k != "lm_head.weight"}
    save_file(state, os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    hf = hf_config_dict(model.config, dtype)
    _write_json(os.path.join(out_dir, "config.json"), hf)
    _write_json(os.path.join(out_dir, "generation_config.json"),
                {"bos_token_id": model.config.bos_token_id, "eos_token_id": model.config.eos_token_id})
    if tokenizer_dir and os.path.isdir(tokenizer_dir):
        for name in os.listdir(tokenizer_dir):
            with open(os.path.join(tokenizer_dir, name), "rb") as fin, \
                    open(os.path.join(out_dir, name), "wb") as fout:
                fout.write(fin.read())


class ModelLoadError(ValueError):
    """A model source that cannot be loaded; the message says what was wrong and what was expected."""


EXPECTED = ("expected an HF model directory (config.json + model.safetensors), a .safetensors, .gguf "
            "or training-checkpoint .pt file, or a hub id such as HuggingFaceTB/SmolLM2-135M")


def _write_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def hf_config_dict(config, dtype=torch.float32):
    """Our config as transformers' LlamaConfig JSON (rope_theta in both the old and new spelling)."""
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
            **asdict(config), "head_dim": config.head_dim, "tie_word_embeddings": True,
            "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0,
            "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
            "dtype": str(dtype).removeprefix("torch."), "use_cache": True}


def config_from_hf(hf, source):
    """Read an HF Llama config.json dict; refuse what this architecture does not implement."""
    hf = dict(hf)
    hf.setdefault("rope_theta", (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0))
    problems = [f"{k}={hf.get(k)!r}" for k, ok in [
        ("model_type", hf.get("model_type", "llama") == "llama"),
        ("hidden_act", hf.get("hidden_act", "silu") == "silu"),
        ("attention_bias", not hf.get("attention_bias")), ("mlp_bias", not hf.get("mlp_bias")),
        ("tie_word_embeddings", hf.get("tie_word_embeddings", True)),
        ("head_dim", hf.get("head_dim") in (None, hf.get("hidden_size", 0) // hf.get("num_attention_heads", 1))),
        ("rope_scaling", not hf.get("rope_scaling") and (hf.get("rope_parameters") or {}).get("rope_type", "default") == "default"),
    ] if not ok]
    if problems:
        raise ModelLoadError(f"{source}: unsupported config ({', '.join(problems)}); expected a Llama "
                             "model with SiLU, no biases, tied embeddings and plain RoPE, like SmolLM2")
    kwargs = {f.name: hf[f.name] for f in fields(SmolLM2Config) if hf.get(f.name) is not None}
    try:
        return SmolLM2Config(**kwargs)
    except (TypeError, ValueError) as e:
        raise ModelLoadError(f"{source}: bad config: {e}") from None


def load_weights(source):
    """(config, state_dict, info) from any source that from_pretrained accepts."""
    if not os.path.exists(source):
        if re.fullmatch(r"[\w.-]+/[\w.-]+", source) and not source.startswith((".", "/")):
            return _load_hub(source)
        raise ModelLoadError(f"{source}: no such file or directory; {EXPECTED}")
    if os.path.isdir(source):
        path = os.path.join(source, "model.safetensors")
        if not os.path.isfile(os.path.join(source, "config.json")) or not os.path.isfile(path):
            raise ModelLoadError(f"{source}: directory has no config.json + model.safetensors; {EXPECTED}")
        return _load_safetensors(path)
    with open(source, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        return _load_gguf(source)
    if magic[:2] == b"PK":  # torch.save's zip format
        return _load_checkpoint(source)
    if source.endswith(".safetensors"):
        return _load_safetensors(source)
    raise ModelLoadError(f"{source}: not a model file (unrecognised format); {EXPECTED}")


def _load_hub(repo_id):
    from huggingface_hub import snapshot_download
    try:
        folder = snapshot_download(repo_id, allow_patterns=["config.json", "model.safetensors"])
    except Exception as e:
        raise ModelLoadError(f"{repo_id}: could not download from the Hugging Face hub "
                             f"({type(e).__name__}: {e}); {EXPECTED}") from None
    return load_weights(folder)


def _load_safetensors(path):
    from safetensors.torch import load_file
    config_path = os.path.join(os.path.dirname(path), "config.json")
    try:
        with open(config_path) as f:
            config = config_from_hf(json.load(f), config_path)
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{config_path}: cannot read the model config ({e}); {EXPECTED}") from None
    try:
        state = load_file(path)
    except Exception as e:
        raise ModelLoadError(f"{path}: not a readable safetensors file, truncated or corrupt ({e})") from None
    return config, state, {"source": path, "format": "safetensors"}


def _load_checkpoint(path):
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        config = SmolLM2Config(**ckpt["config"])
        state = ckpt["model"]
    except Exception as e:
        raise ModelLoadError(f"{path}: not a readable training checkpoint with 'model' and 'config' "
                             f"({type(e).__name__}: {e}); {EXPECTED}") from None
    info = {"source": path, "format": "checkpoint", "step": ckpt.get("step"), "val_loss": ckpt.get("val_loss")}
    return config, state, info


def _load_gguf(path):
    """Dequantise a llama.cpp GGUF file into HF names, undoing llama.cpp's Q/K row permutation."""
    import gguf
    import numpy as np
    try:
        reader = gguf.GGUFReader(path)
        meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")}
        arch = meta["general.architecture"]
        config = SmolLM2Config(
            vocab_size=int(meta[f"{arch}.vocab_size"]), hidden_size=int(meta[f"{arch}.embedding_length"]),
            intermediate_size=int(meta[f"{arch}.feed_forward_length"]),
            num_hidden_layers=int(meta[f"{arch}.block_count"]),
            num_attention_heads=int(meta[f"{arch}.attention.head_count"]),
            num_key_value_heads=int(meta[f"{arch}.attention.head_count_kv"]),
            max_position_embeddings=int(meta[f"{arch}.context_length"]),
            rope_theta=float(meta[f"{arch}.rope.freq_base"]),
            rms_norm_eps=float(np.float32(meta[f"{arch}.attention.layer_norm_rms_epsilon"])),
            bos_token_id=int(reader.fields["tokenizer.ggml.bos_token_id"].contents()),
            eos_token_id=int(reader.fields["tokenizer.ggml.eos_token_id"].contents()))
    except Exception as e:
        raise ModelLoadError(f"{path}: unreadable GGUF file or not a Llama model ({type(e).__name__}: {e})") from None
    names = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "attn_q": "self_attn.q_proj",
             "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
             "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
             "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
    state = {}
    for t in reader.tensors:
        parts = t.name.split(".")  # e.g. blk.3.attn_q.weight or token_embd.weight
        if parts[0] == "blk":
            name = f"model.layers.{parts[1]}.{names[parts[2]]}.weight"
        elif parts[0] in names:
            name = f"{names[parts[0]]}.weight"
        else:
            continue  # output.weight (untied models) and rope tables are not ours
        w = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32))
        w = w.reshape([int(n) for n in reversed(t.shape)])
        if parts[0] == "blk" and parts[2] in ("attn_q", "attn_k"):
            heads = config.num_attention_heads if parts[2] == "attn_q" else config.num_key_value_heads
            # llama.cpp interleaves each head's rotary halves; restore HF's half-split order
            w = w.reshape(heads, config.head_dim // 2, 2, -1).transpose(1, 2).reshape(w.shape)
        state[name] = w
    return config, state, {"source": path, "format": "gguf"}


def check_state_dict(model, state, source):
    """Raise ModelLoadError naming the first missing, unexpected or misshapen tensors."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    state.setdefault("lm_head.weight", state.get("model.embed_tokens.weight"))  # tied
    missing = [k for k in expected if state.get(k) is None]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} has shape {tuple(state[k].shape)} but the config expects {tuple(s)}"
             for k, s in expected.items() if state.get(k) is not None and state[k].shape != s]
    c = model.config
    summary = (f"config: vocab {c.vocab_size}, hidden {c.hidden_size}, layers {c.num_hidden_layers}, "
               f"heads {c.num_attention_heads}/{c.num_key_value_heads} kv, mlp {c.intermediate_size}")
    for problem, items in (("missing tensors", missing), ("unexpected tensors", unexpected),
                           ("weights do not match the config", wrong)):
        if items:
            more = f" (and {len(items) - 3} more)" if len(items) > 3 else ""
            raise ModelLoadError(f"{source}: {problem}: {'; '.join(items[:3])}{more}; {summary}")
