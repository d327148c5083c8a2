"""SmolLM2 weights in and out: an HF model directory (what transformers loads), a .safetensors,
llama.cpp .gguf or training-checkpoint .pt file, or a hub id. model.py's SmolLM2.from_pretrained and
save_pretrained call these, and export.py writes GGUF files with write_gguf. Loading gives a config
dict and a state dict and imports nothing of model.py (which imports this module). Every failure is
a ModelLoadError whose message says what was wrong and what was expected.
"""
import json
import os
import re
from dataclasses import asdict

import numpy as np
import torch

from smollm2 import sharded_checkpoint
from smollm2.chat import IM_END
from smollm2.errors import ExportError, ModelLoadError, reason
from smollm2.files import public_name
from smollm2.tokenizer import TOKENIZER_DIR, load_tokenizer


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
                {"bos_token_id": model.config.bos_token_id, "eos_token_id": generation_eos(model)})
    if tokenizer_dir and os.path.isdir(tokenizer_dir):
        for name in os.listdir(tokenizer_dir):
            with open(os.path.join(tokenizer_dir, name), "rb") as fin, \
                    open(os.path.join(out_dir, name), "wb") as fout:
                fout.write(fin.read())
        if os.path.isfile(os.path.join(out_dir, "tokenizer_config.json")):
            _name_the_models_special_tokens(out_dir, model.config, tokenizer_dir)


def generation_eos(model):
    """generation_config.json's eos_token_id: the model's EOS, and for weights trained on
    conversations whose EOS is another token (a base model fine-tuned, or one trained from scratch)
    <|im_end|> first, which ends each assistant turn: transformers' generate then stops where the
    Space and sample.py do, at the end of the answer."""
    eos = model.config.eos_token_id
    if not getattr(model, "source_info", {}).get("conversations"):
        return eos
    end_of_turn = load_tokenizer().token_to_id(IM_END)
    return [end_of_turn, eos] if end_of_turn not in (None, eos) else eos


def training_info(source, source_info):
    """What an export records of where its weights came from: the source by its file name or hub id
    (never this machine's folders), its format, the training step and validation loss, and
    "conversations": true for weights trained on conversations (the Space then chats)."""
    chat = {"conversations": True} if source_info.get("conversations") else {}
    return {"source": public_name(str(source)), **{k: source_info.get(k) for k in ("format", "step", "val_loss")},
            **chat}


def export_record(path):
    """What the training_info.json beside the weights file at path holds of "step", "val_loss" and
    "conversations" (an export's record of its training); {} when there is none or it is unreadable."""
    try:
        with open(os.path.join(os.path.dirname(path), "training_info.json")) as f:
            saved = json.load(f)
    except (OSError, ValueError):
        return {}
    return {k: saved[k] for k in ("step", "val_loss", "conversations")
            if isinstance(saved, dict) and saved.get(k) is not None}


def trained_on_conversations(data_state):
    """Whether a training checkpoint's data state (its loader's) says it trained on conversations."""
    return bool(isinstance(data_state, dict) and data_state.get("conversations"))


def write_training_info(out_dir, source, source_info):
    """training_info.json beside an export's weights (the Space shows its step and validation loss);
    returns what it holds."""
    info = training_info(source, source_info)
    _write_json(os.path.join(out_dir, "training_info.json"), info)
    return info


def _name_the_models_special_tokens(out_dir, config, tokenizer_dir):
    """tokenizer_config.json's eos_token and bos_token set to the tokens of the model's own ids, so
    that transformers' tokenizer and generate stop at the same token: the Instruct model ends its
    turns with <|im_end|>, where the copied file says the base model's <|endoftext|>."""
    tok = load_tokenizer(tokenizer_dir)
    path = os.path.join(out_dir, "tokenizer_config.json")
    with open(path) as f:
        tokenizer_config = json.load(f)
    for key, token_id in (("bos_token", config.bos_token_id), ("eos_token", config.eos_token_id)):
        token = tok.id_to_token(token_id) if token_id is not None else None
        if token is not None:
            tokenizer_config[key] = token
    _write_json(path, tokenizer_config)


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
    """An HF Llama config.json dict, checked: refuse what this architecture does not implement."""
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
    return {k: v for k, v in hf.items() if v is not None}  # from_pretrained takes SmolLM2Config's fields


# a config.json's shape fields without a default here (HF's LlamaConfig has defaults for them, but a
# config that leaves them out is a mistake, not a wish for Llama-7B's); the others take HF's defaults
SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
HF_LLAMA_DEFAULTS = {"max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "initializer_range": 0.02}


def read_config_json(path, vocab_size):
    """The model config fields of an HF Llama config.json that a run trains from scratch (--model
    path): checked by config_from_hf, the shape fields required, the others HF's defaults; key/value
    heads default to the query heads (HF's rule); the tokenizer's ids must fit its vocab_size."""
    try:
        with open(path) as f:
            hf = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"{path}: not a readable config.json ({reason(e)})") from None
    if not isinstance(hf, dict):
        raise ModelLoadError(f"{path}: not an HF config.json (a JSON object of model settings)")
    if missing := [k for k in SHAPE_FIELDS if hf.get(k) is None]:
        raise ModelLoadError(f"{path}: no {', '.join(missing)}; a Llama config.json gives the model's shape: "
                             f"{', '.join(SHAPE_FIELDS)}")
    if hf.get("attention_dropout"):
        raise ModelLoadError(f"{path}: unsupported config (attention_dropout={hf['attention_dropout']!r}); "
                             "this model has no dropout")
    config = {**HF_LLAMA_DEFAULTS, "num_key_value_heads": hf["num_attention_heads"], "bos_token_id": 0,
              "eos_token_id": 0, **config_from_hf(hf, path)}
    if not isinstance(config["vocab_size"], int) or config["vocab_size"] < vocab_size:
        raise ModelLoadError(f"{path}: vocab_size {config['vocab_size']!r} is smaller than the tokenizer's "
                             f"{vocab_size} tokens; use vocab_size {vocab_size}")
    return config


def load_weights(source):
    """(config fields as a dict, state_dict, info) from any source that from_pretrained accepts."""
    if not os.path.exists(source):
        if re.fullmatch(r"[\w.-]+/[\w.-]+", source) and not source.startswith((".", "/")):
            return _load_hub(source)
        raise ModelLoadError(f"{source}: no such file or directory; {EXPECTED}")
    if sharded_checkpoint.is_sharded(source):  # train.py --fsdp's checkpoint folder: gathered here, on CPU
        return _load_sharded(source)
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
                             f"({reason(e)}); {EXPECTED}") from None
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
    chat = {"conversations": True} if export_record(path).get("conversations") else {}
    return config, state, {"source": path, "format": "safetensors", **chat}


def _load_checkpoint(path):
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        config, state = dict(ckpt["config"]), ckpt["model"]
    except Exception as e:
        raise ModelLoadError(f"{path}: not a readable training checkpoint with 'model' and 'config' "
                             f"({reason(e)}); {EXPECTED}") from None
    info = {"source": path, "format": "checkpoint", "step": ckpt.get("step"), "val_loss": ckpt.get("val_loss"),
            "conversations": trained_on_conversations(ckpt.get("data"))}
    return config, state, info


def _load_sharded(path):
    try:
        train_state = sharded_checkpoint.load_train_state(path)
        config, state = dict(train_state["config"]), sharded_checkpoint.gather_weights(path)
    except Exception as e:
        raise ModelLoadError(f"{path}: not a readable sharded checkpoint ({reason(e)}); {EXPECTED}") from None
    info = {"source": path, "format": "sharded checkpoint", "step": train_state.get("step"),
            "val_loss": train_state.get("val_loss"),
            "conversations": trained_on_conversations(train_state.get("data"))}
    return config, state, info


def _load_gguf(path):
    """Dequantise a llama.cpp GGUF file into HF names, undoing llama.cpp's Q/K row permutation."""
    import gguf
    try:
        reader = gguf.GGUFReader(path)
        meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")}
        arch = meta["general.architecture"]
        config = dict(
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
        raise ModelLoadError(f"{path}: unreadable GGUF file or not a Llama model ({reason(e)})") from None
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
            heads = config["num_attention_heads"] if parts[2] == "attn_q" else config["num_key_value_heads"]
            head_dim = config["hidden_size"] // config["num_attention_heads"]
            # llama.cpp interleaves each head's rotary halves; restore HF's half-split order
            w = w.reshape(heads, head_dim // 2, 2, -1).transpose(1, 2).reshape(w.shape)
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


# ----------------------------------------------------------------------------- GGUF
def llama_cpp_qk(w, heads):
    """HF's half-split RoPE rows -> llama.cpp's interleaved pairs, per head (_load_gguf undoes
    exactly this)."""
    rows, cols = w.shape
    return w.reshape(heads, 2, rows // heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def write_gguf(model, path, ggml_type, tokenizer_dir=TOKENIZER_DIR):
    """One GGUF file: metadata, the tokenizer, then every tensor (matrices in ggml_type)."""
    try:
        import gguf
    except ImportError:
        raise ExportError("a .gguf output needs the gguf package: pip install gguf") from None
    c = model.config
    file_type = {"F32": gguf.LlamaFileType.ALL_F32, "F16": gguf.LlamaFileType.MOSTLY_F16,
                 "BF16": gguf.LlamaFileType.MOSTLY_BF16, "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[ggml_type]
    w = gguf.GGUFWriter(path=None, arch="llama")
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(os.path.splitext(os.path.basename(path))[0])
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(c.rope_theta)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_key_length(c.head_dim)
    w.add_value_length(c.head_dim)
    w.add_rope_dimension_count(c.head_dim)
    w.add_vocab_size(c.vocab_size)
    w.add_file_type(file_type)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_tokenizer(w, c, tokenizer_dir)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, c.num_hidden_layers)
    qtype = getattr(gguf.GGMLQuantizationType, ggml_type)
    for hf_name, t in model.state_dict().items():
        if hf_name == "lm_head.weight":
            continue  # tied: llama.cpp reuses token_embd
        a = t.detach().to("cpu", torch.float32).numpy()
        if hf_name.endswith(("q_proj.weight", "k_proj.weight")):
            a = llama_cpp_qk(a, c.num_attention_heads if "q_proj" in hf_name else c.num_key_value_heads)
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ExportError(f"no GGUF name for tensor {hf_name}")
        if a.ndim == 1 or qtype == gguf.GGMLQuantizationType.F32:  # norms stay F32 in every file
            w.add_tensor(name, np.ascontiguousarray(a))
        elif qtype == gguf.GGMLQuantizationType.F16:
            w.add_tensor(name, a.astype(np.float16))
        else:  # BF16 and Q8_0: gguf's numpy quantizer, stored as raw bytes of that type
            w.add_tensor(name, gguf.quants.quantize(a, qtype), raw_dtype=qtype)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"  # a half-written .gguf never takes the name
    try:
        w.write_header_to_file(tmp)
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def add_tokenizer(w, config, tokenizer_dir):
    """Tokens by id, CONTROL for the special added tokens, merges and chat template (SpecialVocab)."""
    import gguf
    tok = load_tokenizer(tokenizer_dir)
    vocab = tok.get_vocab(with_added_tokens=True)
    if len(vocab) != config.vocab_size or sorted(vocab.values()) != list(range(config.vocab_size)):
        raise ExportError(f"tokenizer in {tokenizer_dir} has {len(vocab)} tokens, the model "
                          f"{config.vocab_size}; expected one token per embedding row")
    tokens = sorted(vocab, key=vocab.get)
    special = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")  # llama.cpp's name for this tokenizer's pre-tokenizer regex
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    vocab_extra = gguf.SpecialVocab(tokenizer_dir, load_merges=True, n_vocab=config.vocab_size)
    # the model's own ids win over tokenizer_config's: the Instruct model ends turns with <|im_end|>
    vocab_extra.special_token_ids.update(bos=config.bos_token_id, eos=config.eos_token_id)
    vocab_extra.add_to_gguf(w, quiet=True)
