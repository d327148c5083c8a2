"""The README.md card of an exported model: YAML metadata the hub reads, how to load it with
transformers, and the training run's summary (preset, steps, tokens, losses, the command, the loss
curve) read from the checkpoint it came from. Paths are named by their file names (public_name): a
card is published, and the exporting machine's folders say nothing to its readers."""
import os
import re
import shlex
import shutil

import torch

from smollm2 import optim
from smollm2.checkpoint import run_file
from smollm2.files import public_name
from smollm2.loggers import plot_loss
from smollm2.train_args import DEFAULTS, build_parser

HUB_ID = re.compile(r"[\w.-]+/[\w.-]+")
CARD_MARK = "<!-- model card written by smollm2's export.py -->"


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
             "by this repo's `export.py`. It loads with `transformers`:", "",
             "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
             f'model = AutoModelForCausalLM.from_pretrained("{name}")',
             f'tokenizer = AutoTokenizer.from_pretrained("{name}")', "```", ""]
    if info.get("chat"):
        meta.tags.append("conversational")
        lines += ["## Chat", "", "A chat model: it answers in SmolLM2's chat template, which this directory "
                  "carries (`chat_template.jinja`), so the tokenizer builds its prompts:", "", "```python",
                  'messages = [{"role": "user", "content": "What is the capital of France?"}]',
                  "ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors=\"pt\")",
                  "print(tokenizer.decode(model.generate(ids, max_new_tokens=64)[0, ids.shape[1]:]))", "```",
                  "", "Its GGUF export (`export.py SOURCE model.gguf`) carries the template as "
                  "`tokenizer.chat_template`, so `llama-cli -m model.gguf -cnv` chats.", ""]
    if args:
        lines += training_summary(args, history, ckpt.get("step"), init, out_dir)
    else:
        lines += ["## Source", "", f"Exported from `{public_name(source)}` ({info['format']}); no "
                  "training run recorded in it.", ""]
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
             f"| started from | {f'`{public_name(init)}`' if init else 'random initialisation'} |",
             f"| preset | {args.get('model')} |",
             f"| steps | {step} |",
             f"| tokens seen | {step * per_step:,} ({per_step:,} per step) |",
             f"| data | `{public_name(args.get('data'))}` (last {args.get('val_frac')} held out for "
             "validation) |",
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
        plot_loss(history, target)
    if os.path.isfile(target):
        lines += ["![training and validation loss](loss.png)", ""]
    return lines


def train_command(args):
    """`python train.py ...` with every setting that differs from train.py's defaults."""
    parts = ["python", "train.py"] if args.get("world_size", 1) == 1 else \
        ["torchrun", f"--nproc_per_node={args['world_size']}", "train.py"]
    save = args.get("save") or DEFAULTS["save"]
    derived = {"plot": run_file(save, "plot"), "metrics": run_file(save, "metrics"),  # resolve_args' defaults
               "lr": optim.DEFAULT_LR.get(args.get("optimizer") or "adamw")}
    for action in build_parser()._actions:
        dest, value = action.dest, args.get(action.dest)
        if not action.option_strings or dest in ("help", "export", "push_to_hub") or value is None:
            continue
        if value == action.default or value == DEFAULTS.get(dest) or value == derived.get(dest):
            if dest != "steps":
                continue
        flag = action.option_strings[0]
        if value is True:
            parts.append(flag)
        elif value is not False:
            parts += [flag, str(public_name(value))]
    return shlex.join(parts)
