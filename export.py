"""Take a trained model out of the repo: a GGUF file for llama.cpp / Ollama / LM Studio, or an HF
directory with a model card, optionally pushed to the Hugging Face hub.

    python export.py checkpoint.pt out/                           # HF directory + README.md card
    python export.py checkpoint.pt model.gguf                     # one GGUF file, F16
    python export.py checkpoint.pt model-q8.gguf --dtype q8_0     # Q8_0
    python export.py checkpoint.pt out/ --push-to-hub you/smollm2-shakespeare
    python export.py checkpoint.pt --space space/                 # a Space folder to push alone

The GGUF layout follows llama.cpp's convert_hf_to_gguf.py for Llama models: llama.* metadata
keys, Q/K rows permuted into llama.cpp's interleaved RoPE order, token_embd / blk.N.* /
output_norm tensor names, no output.weight (llama.cpp ties it to the embedding), norms in F32,
and the tokenizer as "gpt2" byte-level BPE with the "smollm" pre-tokenizer.
"""
import argparse
import os

import torch

from model import SmolLM2
from smollm2 import space
from smollm2.cli import OneLineParser, main_guard
from smollm2.errors import ExportError, UsageError, reason
from smollm2.files import check_writable
from smollm2.model_card import write_model_card
from smollm2.sampling import is_chat_model
from smollm2.tokenizer import load_tokenizer
from smollm2.weights import training_info, write_gguf, write_training_info

# --dtype spellings -> (torch dtype for an HF directory, GGML type name for a GGUF file)
DTYPES = {"auto": (torch.bfloat16, "F16"), "bf16": (torch.bfloat16, "BF16"),
          "fp32": (torch.float32, "F32"), "f32": (torch.float32, "F32"),
          "fp16": (torch.float16, "F16"), "f16": (torch.float16, "F16"), "q8_0": (None, "Q8_0")}


def export(source, out, dtype="auto", push_to_hub=None):
    """Write source (anything SmolLM2.from_pretrained reads) to out: a .gguf file if out ends in
    .gguf, else an HF directory with a model card; then upload it to push_to_hub if given."""
    dtype = (dtype or "auto").lower()
    gguf_out = str(out).endswith(".gguf")
    if dtype not in DTYPES or (not gguf_out and DTYPES[dtype][0] is None):
        allowed = "auto, fp32, fp16, bf16" + (", q8_0" if gguf_out else " (q8_0: GGUF only)")
        raise ExportError(f"--dtype {dtype} is not an export dtype; use {allowed}")
    if push_to_hub:
        hub = hub_api()  # offline or not logged in: fail before the work, not after
    if gguf_out and os.path.isdir(out):
        raise ExportError(f"{out} is a directory; a .gguf output must be a file path")
    if not gguf_out and os.path.exists(out) and not os.path.isdir(out):
        raise ExportError(f"{out} exists and is not a directory")
    check_output(out, directory=not gguf_out)
    model = SmolLM2.from_pretrained(source)
    info = training_info(source, model.source_info)  # published: the source by its file name or hub id
    if gguf_out:
        write_gguf(model, out, DTYPES[dtype][1])
        what = f"GGUF {DTYPES[dtype][1]}"
    else:
        model.save_pretrained(out, dtype=DTYPES[dtype][0])
        write_training_info(out, source, model.source_info)
        info["chat"] = bool(model.source_info.get("conversations")) or \
            is_chat_model(load_tokenizer(), model.config.eos_token_id)
        card = write_model_card(out, source, info, push_to_hub)
        what = (f"{str(DTYPES[dtype][0]).removeprefix('torch.')}: config.json, model.safetensors, "
                f"tokenizer files, {os.path.basename(card)}")
    val_loss = f", val loss {info['val_loss']:.4f}" if info["val_loss"] is not None else ""
    run = f" (step {info['step']}{val_loss})" if info["step"] is not None else ""
    print(f"exported {source}{run} to {out} in {what}")
    if push_to_hub:
        push(hub, out, push_to_hub)
    return 0


def check_output(path, directory, prefix=""):
    """Refuse, before any work, an output that could not be written (files.check_writable), the flag
    that asked for it in front of the line."""
    try:
        check_writable(path, directory=directory)
    except UsageError as e:
        raise ExportError(f"{prefix}{e}") from None


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
            api.upload_folder(repo_id=repo_id, folder_path=out, commit_message="Upload from smollm2 export.py")
        else:
            api.upload_file(repo_id=repo_id, path_or_fileobj=out, path_in_repo=os.path.basename(out))
    except Exception as e:
        raise ExportError(f"--push-to-hub {repo_id}: upload failed ({reason(e)})") from None
    print(f"pushed {out} to {url}")


def main(argv=None):
    intro, examples = __doc__.split("\n\n")[:2]  # what it does, then the commands, as laid out
    p = OneLineParser(description=intro, epilog="examples:\n" + examples,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="checkpoint, best.pt, HF directory, .gguf, .safetensors or hub id")
    p.add_argument("out", nargs="?", help="OUT.gguf for a GGUF file, anything else for an HF directory")
    p.add_argument("--dtype", default="auto", help="fp32, fp16, bf16, q8_0 (GGUF only); auto = bf16 "
                   "for an HF directory or a Space, F16 for GGUF")
    p.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the export to this hub repo")
    p.add_argument("--space", metavar="DIR", help="assemble a self-contained Hugging Face Space folder: "
                   "the app, the weights, model.py, the smollm2 modules it needs and tokenizer/")
    args = p.parse_args(argv)
    if args.space:
        if args.out or args.push_to_hub:
            raise ExportError("--space DIR takes the source alone: no OUT, no --push-to-hub (push DIR)")
        return export_space(args.source, args.space, args.dtype)
    if not args.out:
        raise ExportError("give OUT (a .gguf file or an HF directory), or --space DIR")
    return export(args.source, args.out, args.dtype, args.push_to_hub)


def export_space(source, out_dir, dtype="auto"):
    dtype = (dtype or "auto").lower()
    if dtype not in DTYPES or DTYPES[dtype][0] is None:
        raise ExportError(f"--space: --dtype {dtype} is not a Space dtype; use auto, fp32, fp16, bf16")
    if not os.path.exists(out_dir) or os.path.isdir(out_dir):  # a file there: assemble says so
        check_output(out_dir, directory=True, prefix="--space: ")
    files = space.assemble(source, out_dir, DTYPES[dtype][0])
    print(f"assembled the Space {out_dir}: {', '.join(files)}\n"
          f"run it: python {os.path.join(out_dir, 'app.py')}; push it: hf upload USER/SPACE {out_dir} "
          "--repo-type space")
    return 0


if __name__ == "__main__":
    main_guard(main, "export.py")
