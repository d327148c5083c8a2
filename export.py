"""Take a trained model out of the repo: a GGUF file for llama.cpp / Ollama / LM Studio, or an HF
directory with a model card, optionally pushed to the Hugging Face hub.

    python train.py --export checkpoint.pt out/                   # HF directory + README.md card
    python train.py --export checkpoint.pt model.gguf --dtype fp16
    python export.py checkpoint.pt model-q8.gguf --dtype q8_0     # Q8_0 (not a training dtype)
    python train.py --export checkpoint.pt out/ --push-to-hub you/smollm2-shakespeare

The GGUF layout follows llama.cpp's convert_hf_to_gguf.py for Llama models: llama.* metadata
keys, Q/K rows permuted into llama.cpp's interleaved RoPE order, token_embd / blk.N.* /
output_norm tensor names, no output.weight (llama.cpp ties it to the embedding), norms in F32,
and the tokenizer as "gpt2" byte-level BPE with the "smollm" pre-tokenizer.
"""
import argparse
import json
import os
import re
import shlex
import shutil
import sys

import numpy as np
import torch

from model import HERE, SmolLM2
from weights import ModelLoadError

TOKENIZER_DIR = os.path.join(HERE, "tokenizer")
HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
CARD_MARK = "<!-- model card written by smollm2's export.py -->"
# --dtype spellings -> (torch dtype for an HF directory, GGML type name for a GGUF file)
DTYPES = {"auto": (torch.bfloat16, "F16"), "bf16": (torch.bfloat16, "BF16"),
          "fp32": (torch.float32, "F32"), "f32": (torch.float32, "F32"),
          "fp16": (torch.float16, "F16"), "f16": (torch.float16, "F16"), "q8_0": (None, "Q8_0")}


class ExportError(ValueError):
    """Bad export request; the message is one line a CLI prints as-is (exit status 2)."""


def export(source, out, dtype="auto", push_to_hub=None):
    """Write source (anything SmolLM2.from_pretrained reads) to out: a .gguf file if out ends in
    .gguf, else an HF directory with a model card; then upload it to push_to_hub if given."""
    dtype = (dtype or "auto").lower()
    gguf_out = str(out).endswith(".gguf")
    if dtype not in DTYPES or (not gguf_out and DTYPES[dtype][0] is None):
        allowed = "auto, fp32, fp16, bf16" + (", q8_0" if gguf_out else " (q8_0: GGUF only)")
        raise ExportError(f"--export: --dtype {dtype} is not an export dtype; use {allowed}")
    if push_to_hub:
        hub = hub_api()  # offline or not logged in: fail before the work, not after
    if gguf_out and os.path.isdir(out):
        raise ExportError(f"--export: {out} is a directory; a .gguf output must be a file path")
    if not gguf_out and os.path.exists(out) and not os.path.isdir(out):
        raise ExportError(f"--export: {out} exists and is not a directory")
    model = SmolLM2.from_pretrained(source)
    info = {k: model.source_info.get(k) for k in ("source", "format", "step", "val_loss")}
    if gguf_out:
        write_gguf(model, out, DTYPES[dtype][1])
        what = f"GGUF {DTYPES[dtype][1]}"
    else:
        model.save_pretrained(out, dtype=DTYPES[dtype][0])
        with open(os.path.join(out, "training_info.json"), "w") as f:
            json.dump(info, f, indent=2)
        card = write_model_card(out, source, info, push_to_hub)
        what = (f"{str(DTYPES[dtype][0]).removeprefix('torch.')}: config.json, model.safetensors, "
                f"tokenizer files, {os.path.basename(card)}")
    run = f" (step {info['step']}, val loss {info['val_loss']})" if info["step"] is not None else ""
    print(f"exported {source}{run} to {out} in {what}")
    if push_to_hub:
        push(hub, out, push_to_hub)
    return 0


# ----------------------------------------------------------------------------- GGUF
def llama_cpp_qk(w, heads):
    """HF's half-split RoPE rows -> llama.cpp's interleaved pairs, per head (weights.py's GGUF
    loader undoes exactly this)."""
    rows, cols = w.shape
    return w.reshape(heads, 2, rows // heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)


def write_gguf(model, path, ggml_type, tokenizer_dir=TOKENIZER_DIR):
    """One GGUF file: metadata, the tokenizer, then every tensor (matrices in ggml_type)."""
    try:
        import gguf
    except ImportError:
        raise ExportError("--export: a .gguf output needs the gguf package: pip install gguf") from None
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
            raise ExportError(f"--export: no GGUF name for tensor {hf_name}")
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
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(os.path.join(tokenizer_dir, "tokenizer.json"))
    vocab = tok.get_vocab(with_added_tokens=True)
    if len(vocab) != config.vocab_size or sorted(vocab.values()) != list(range(config.vocab_size)):
        raise ExportError(f"--export: tokenizer in {tokenizer_dir} has {len(vocab)} tokens, the model "
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


# ----------------------------------------------------------------------------- model card
def write_model_card(out_dir, source, info, repo_id=None):
    """README.md: YAML metadata the hub reads, and the run's summary from the checkpoint. A README.md
    we did not write (hf_files/'s Space metadata) is kept: the card goes to MODEL_CARD.md instead.
    Returns the card's path."""
    from huggingface_hub import ModelCard, ModelCardData
    ckpt = read_run(source) if info["format"] == "checkpoint" else {}
    args, history = ckpt.get("args") or {}, ckpt.get("history") or {}
    init = args.get("init")
    base_model = init if init and HUB_ID.fullmatch(init) and not os.path.exists(init) else None
    meta = ModelCardData(library_name="transformers", license="apache-2.0", pipeline_tag="text-generation",
                         tags=["smollm2", "llama", "text-generation", "pytorch"], base_model=base_model)
    name = repo_id or os.path.basename(os.path.normpath(out_dir))  # what from_pretrained is given
    lines = [f"# {name}", "", "A SmolLM2-architecture Llama model (tied embeddings, GQA, RoPE) exported "
             "by this repo's `train.py --export`. It loads with `transformers`:", "",
             "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
             f'model = AutoModelForCausalLM.from_pretrained("{name}")',
             f'tokenizer = AutoTokenizer.from_pretrained("{name}")', "```", ""]
    if args:
        lines += training_summary(args, history, ckpt.get("step"), init, out_dir)
    else:
        lines += ["## Source", "", f"Exported from `{source}` ({info['format']}); no training run "
                  "recorded in it.", ""]
    card = ModelCard(f"---\n{meta.to_yaml()}\n---\n{CARD_MARK}\n\n" + "\n".join(lines))
    path = os.path.join(out_dir, "README.md")
    if os.path.exists(path):
        with open(path, encoding="utf-8", errors="replace") as f:
            if CARD_MARK not in f.read():
                path = os.path.join(out_dir, "MODEL_CARD.md")
    card.save(path)
    return path


def read_run(path):
    """The checkpoint's args, history and step, memory-mapped: the optimizer state is never read."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # a legacy (non-zip) file: mmap is not possible
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    return {k: ckpt.get(k) for k in ("args", "history", "step")}


def training_summary(args, history, step, init, out_dir):
    per_step = (args.get("batch_size", 0) * args.get("seq_len", 0) * args.get("grad_accum", 1)
                * args.get("world_size", 1))
    vals = history.get("val_loss") or []
    final_val = f"{vals[-1]:.4f} (step {history['val_step'][-1]})" if vals else "not measured"
    best_val = (f"{min(vals):.4f} (step {history['val_step'][vals.index(min(vals))]})" if vals
                else "not measured")
    final_train = f"{history['loss'][-1]:.4f}" if history.get("loss") else "not logged"
    lines = ["## Training", "",
             "| | |", "| --- | --- |",
             f"| started from | {f'`{init}`' if init else 'random initialisation'} |",
             f"| preset | {args.get('model')} |",
             f"| steps | {step} |",
             f"| tokens seen | {step * per_step:,} ({per_step:,} per step) |",
             f"| data | `{args.get('data')}` (last {args.get('val_frac')} held out for validation) |",
             f"| final training loss | {final_train} |",
             f"| final validation loss | {final_val} |",
             f"| best validation loss | {best_val} |", "",
             "Losses are cross-entropy in nats per token. The run's command:", "",
             "```bash", train_command(args), "```", ""]
    plot = args.get("plot")
    target = os.path.join(out_dir, "loss.png")
    if plot and os.path.isfile(plot):
        shutil.copyfile(plot, target)
    elif history.get("step"):
        from checkpoint import plot_loss
        plot_loss(history, target)
    if os.path.isfile(target):
        lines += ["![training and validation loss](loss.png)", ""]
    return lines


def train_command(args):
    """`python train.py ...` with every setting that differs from train.py's defaults."""
    from cli import DEFAULTS, build_parser
    parts = ["python", "train.py"] if args.get("world_size", 1) == 1 else \
        ["torchrun", f"--nproc_per_node={args['world_size']}", "train.py"]
    default_plot = os.path.join(os.path.dirname(args.get("save") or ""), "loss.png")
    for action in build_parser()._actions:
        dest, value = action.dest, args.get(action.dest)
        if not action.option_strings or dest in ("help", "export", "push_to_hub") or value is None:
            continue
        if value == action.default or value == DEFAULTS.get(dest) or (dest == "plot" and value == default_plot):
            if dest != "steps":
                continue
        flag = action.option_strings[0]
        if value is True:
            parts.append(flag)
        elif value is not False:
            parts += [flag, str(value)]
    return shlex.join(parts)


# ----------------------------------------------------------------------------- hub
def hub_api():
    """An authenticated HfApi, or ExportError when offline or not logged in (no network used)."""
    from huggingface_hub import HfApi, constants, get_token
    if constants.HF_HUB_OFFLINE:
        raise ExportError("--push-to-hub: HF_HUB_OFFLINE is set, so nothing can be uploaded; unset it "
                          "(and run `hf auth login`) to push")
    if not get_token():
        raise ExportError("--push-to-hub: not logged in to the Hugging Face hub; run `hf auth login` "
                          "or set HF_TOKEN, then export again")
    return HfApi()


def push(api, out, repo_id):
    try:
        url = api.create_repo(repo_id, repo_type="model", exist_ok=True)
        if os.path.isdir(out):
            api.upload_folder(repo_id=repo_id, folder_path=out, commit_message="Upload from smollm2 train.py --export")
        else:
            api.upload_file(repo_id=repo_id, path_or_fileobj=out, path_in_repo=os.path.basename(out))
    except Exception as e:
        reason = str(e).strip().split("\n")[0][:160]
        raise ExportError(f"--push-to-hub {repo_id}: upload failed ({type(e).__name__}: {reason})") from None
    print(f"pushed {out} to {url}")


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # one line, like train.py's
        raise ExportError(message)


def main(argv=None):
    p = OneLineParser(description=__doc__.split("\n")[0])
    p.add_argument("source", help="checkpoint, best.pt, HF directory, .gguf, .safetensors or hub id")
    p.add_argument("out", help="OUT.gguf for a GGUF file, anything else for an HF directory")
    p.add_argument("--dtype", default="auto", help="fp32, fp16, bf16, q8_0 (GGUF only); auto = bf16 "
                   "for an HF directory, F16 for GGUF")
    p.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the export to this hub repo")
    args = p.parse_args(argv)
    return export(args.source, args.out, args.dtype, args.push_to_hub)


if __name__ == "__main__":
    try:
        code = main()
    except (ExportError, ModelLoadError) as e:
        print(f"export.py: error: {e}", file=sys.stderr)
        code = 2
    sys.exit(code)
