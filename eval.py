"""Loss, perplexity and bits per byte of any model on any text train.py reads.

    python eval.py checkpoint.pt --data heldout.txt
    python eval.py SmolLM2-135M-Instruct.Q4_1.gguf --data heldout.txt --json real.json

SOURCE is anything SmolLM2.from_pretrained reads (a checkpoint, best.pt, an HF directory, a .gguf,
a hub id). smollm2/loss_eval.py gives the definition, so numbers compare across tools: every token
from the second on predicted once, in windows of --seq-len; bits per byte = total nats / ln 2 / the
data's UTF-8 bytes (tokenizer-independent, as in nanochat's loss_eval).
"""
import json
import os
import sys

from smollm2.cli import POS_INT, OneLineParser, main_guard
from smollm2.devices import available_devices, pick_device
from smollm2.errors import UsageError
from smollm2.files import check_writable
from smollm2.loss_eval import evaluate


def main(argv=None):
    p = OneLineParser(description=__doc__.split("\n")[0])
    p.add_argument("source", help="checkpoint, HF directory, .gguf, .safetensors or hub id")
    p.add_argument("--data", required=True, help="any train.py --data: text, .parquet, .jsonl(.gz) "
                   "files, a directory or glob of them, or hf:NAME[:CONFIG]")
    p.add_argument("--text-column", default="text",
                   help="the text column of parquet/JSONL/hf: rows (default %(default)s)")
    p.add_argument("--max-tokens", type=POS_INT, default=1_000_000, help="hf: streams only: whole "
                   "documents from the start up to this many tokens (default %(default)s)")
    p.add_argument("--seq-len", type=POS_INT, default=1024,
                   help="tokens predicted per window (default %(default)s)")
    p.add_argument("--batch-size", type=POS_INT, default=1,
                   help="windows per forward pass (default %(default)s)")
    p.add_argument("--device", default="auto",
                   help="cpu, cuda, cuda:N or mps (default %(default)s: cuda, then mps, then cpu)")
    p.add_argument("--json", metavar="OUT", help="also write the result as JSON to this file (default none: "
                   "printed only)")
    args = p.parse_args(argv)
    if args.json:  # checked before the evaluation, which takes minutes on a real model
        if os.path.isdir(args.json):
            raise UsageError(f"--json {args.json} is a directory; give a file path")
        check_writable(args.json)
    device = pick_device(args.device, available_devices())
    result = evaluate(args.source, args.data, args.seq_len, args.batch_size, device,
                      sys.stderr.isatty(), args.text_column, args.max_tokens)
    print(f"{result['source']} on {args.data}: loss {result['loss']:.4f} | perplexity "
          f"{result['perplexity']:.2f} | bits per byte {result['bits_per_byte']:.4f} | "
          f"{result['tokens']:,} tokens, {result['bytes']:,} bytes")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
            f.write("\n")
    return 0


if __name__ == "__main__":
    main_guard(main, "eval.py")
