"""Loss, perplexity and bits per byte of any model on any text train.py reads, and its accuracy on
zero-shot tasks.

    python eval.py checkpoint.pt --data heldout.txt
    python eval.py SmolLM2-135M-Instruct.Q4_1.gguf --data heldout.txt --json real.json
    python eval.py checkpoint.pt --tasks core                 # the five shipped tasks (data/eval/)
    python eval.py checkpoint.pt --tasks arc_easy,my_task.jsonl --limit 200 --json scores.json

SOURCE is anything SmolLM2.from_pretrained reads (a checkpoint, best.pt, an HF directory, a .gguf,
a hub id). smollm2/loss_eval.py gives the definition, so numbers compare across tools: every token
from the second on predicted once, in windows of --seq-len; bits per byte = total nats / ln 2 / the
data's UTF-8 bytes (tokenizer-independent, as in nanochat's loss_eval). --tasks scores by CORE's
rules (smollm2/zero_shot.py gives them) and prints each task's accuracy, its chance level and the
average of the accuracies above chance. On conversations (rows with a `messages` column, as train.py
reads them) the loss is over the assistant tokens only, each conversation scored on its own.
"""
import json
import os
import sys
import time

import torch

from smollm2 import devices, speedups, zero_shot
from smollm2.cli import POS_INT, OneLineParser, main_guard
from smollm2.devices import available_devices, pick_device
from smollm2.errors import UsageError
from smollm2.files import check_writable
from smollm2.loss_eval import eval_batch_size, evaluate
from smollm2.tokenizer import load_tokenizer


def main(argv=None):
    p = OneLineParser(description=__doc__.split("\n")[0])
    p.add_argument("source", help="checkpoint, HF directory, .gguf, .safetensors or hub id")
    p.add_argument("--data", help="any train.py --data: text, .parquet, .jsonl(.gz) "
                   "files, a directory or glob of them, or hf:NAME[:CONFIG]")
    p.add_argument("--tasks", help="zero-shot tasks: core (all five shipped), a comma list of their names "
                   f"({', '.join(zero_shot.TASKS)}) and paths to JSONL files in llm-foundry's layout, each "
                   "optionally NAME:ROWS")
    p.add_argument("--limit", type=POS_INT, help="--tasks: score the first N rows of each task (default all)")
    p.add_argument("--delimiter", default=None, help="--tasks: the continuation delimiter of JSONL files "
                   "given by path (default \" \"; the shipped tasks carry theirs)")
    p.add_argument("--dtype", choices=["auto", "fp32", "bf16"], default="auto", help="--tasks: auto = bf16 "
                   "autocast where the device has native bf16, else fp32")
    p.add_argument("--text-column", default="text",
                   help="the text column of parquet/JSONL/hf: rows (default %(default)s)")
    p.add_argument("--max-tokens", type=POS_INT, default=1_000_000, help="hf: streams only: whole "
                   "documents from the start up to this many tokens (default %(default)s)")
    p.add_argument("--seq-len", type=POS_INT, default=1024,
                   help="tokens predicted per window (default %(default)s)")
    p.add_argument("--batch-size", type=POS_INT, default=None,
                   help="windows per forward pass (default 1 on a CPU or Mac, 16 on a GPU)")
    p.add_argument("--device", default="auto",
                   help="cpu, cuda, cuda:N or mps (default %(default)s: cuda, then mps, then cpu)")
    p.add_argument("--json", metavar="OUT", help="also write the result as JSON to this file (default none: "
                   "printed only)")
    args = p.parse_args(argv)
    if not args.data and not args.tasks:
        raise UsageError("give --data (loss and bits per byte on a text) or --tasks (zero-shot accuracy), or both")
    tasks = zero_shot.parse_tasks(args.tasks, args.limit) if args.tasks else []
    if args.json:  # checked before the evaluation, which takes minutes on a real model
        if os.path.isdir(args.json):
            raise UsageError(f"--json {args.json} is a directory; give a file path")
        check_writable(args.json)
    device = pick_device(args.device, available_devices())
    result = {"source": args.source}
    if tasks:  # checked before the model loads: a bad task file is one line, at once
        loaded = [zero_shot.load_task(name, args.delimiter if name not in zero_shot.TASKS else None, rows)
                  for name, rows in tasks]
    model = load_model(args.source, device)
    if args.data:
        batch_size = args.batch_size or eval_batch_size(torch.device(device).type)
        result = evaluate(args.source, args.data, args.seq_len, batch_size, device,
                          sys.stderr.isatty(), args.text_column, args.max_tokens, model)
        what = (f"{result['tokens']:,} assistant tokens of {result['conversations']:,} conversations, "
                f"{result['bytes']:,} bytes of their contents" if result.get("assistant_tokens_only")
                else f"{result['tokens']:,} tokens, {result['bytes']:,} bytes")
        print(f"{result['source']} on {args.data}: loss {result['loss']:.4f} | perplexity "
              f"{result['perplexity']:.2f} | bits per byte {result['bits_per_byte']:.4f} | {what}")
    if tasks:
        result.update(score(args, loaded, device, model))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
    return 0


def load_model(source, device):
    """The weights to evaluate, with this device's speed-ups (smollm2/speedups.py: on a GPU, the
    attention kernel that fits it; nothing on a CPU)."""
    from model import SmolLM2
    model = SmolLM2.from_pretrained(source, device=device).eval()
    if torch.device(device).type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 products, as train.py's evaluation
    for line in speedups.install(model, device):
        print(f"eval.py: speed-up: {line}", file=sys.stderr)
    return model


def score(args, tasks, device, model):
    """The zero-shot tasks' table, printed; their record for --json."""
    dtype = "bf16" if args.dtype == "bf16" or (args.dtype == "auto" and devices.pick_dtype(
        devices.device_facts(device))[0] == "bf16") else "fp32"
    tokenizer, start, scores = load_tokenizer(), time.perf_counter(), {}
    for task in tasks:
        began = time.perf_counter()
        scores[task.name] = {**zero_shot.score_task(model, tokenizer, task, device, dtype),
                             "layout": task.layout, "seconds": time.perf_counter() - began, "results": task.results}
    seconds = time.perf_counter() - start
    print(f"{args.source}, zero-shot, {dtype} on {device}, {seconds:.0f} s:")
    print(zero_shot.table(scores))
    return {"tasks": scores, "centred_average": zero_shot.centred(scores), "dtype": dtype, "seconds": seconds}


if __name__ == "__main__":
    main_guard(main, "eval.py")
