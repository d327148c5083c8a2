"""Loss, perplexity and bits per byte of any model on any text train.py reads.

    python eval.py checkpoint.pt --data heldout.txt
    python eval.py SmolLM2-135M-Instruct.Q4_1.gguf --data heldout.txt --json real.json

SOURCE is anything SmolLM2.from_pretrained reads (a checkpoint, best.pt, an HF directory, a .gguf,
a hub id). The definition, so numbers compare across tools: the data's token ids t0..tN exactly as
data.py produces them (no BOS added) are cut into windows of seq_len + 1 tokens starting every
seq_len tokens (the last one may be shorter); each window predicts its tokens after the first, so
every token from t1 on is predicted exactly once, from the tokens before it in its window.
loss = mean cross-entropy (nats/token) over them, perplexity = exp(loss), bits per byte = total
nats / ln 2 / the data's UTF-8 bytes (a tokenizer-independent figure, as in nanochat's loss_eval).
"""
import argparse
import json
import math
import os
import sys

import numpy as np
import torch

import data
import sources
from model import SmolLM2
from weights import ModelLoadError
from train_kernels import ChunkedLoss


class EvalError(ValueError):
    """Bad command-line input: one line on stderr, exit status 2."""


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        raise EvalError(message)


def load_corpus(spec, progress=False, column="text", max_tokens=1_000_000):
    """(token ids, UTF-8 bytes of their text) of a data source exactly as train.py reads it: text
    files (their sizes are their bytes), parquet/JSONL rows (the bytes of each row's column), or an
    hf: stream (whole documents from its start until max_tokens; it may be endless)."""
    if sources.is_stream(spec):  # a reading error: one DataError line
        tokens, _, n_bytes = sources.stream_documents(spec, max_tokens, column)
        return tokens, n_bytes
    ids = data.tokenize_corpus(spec, progress=progress, text_column=column)
    n_bytes = 0
    for f in data.resolve_files(spec):
        if sources.is_row_file(f):
            n_bytes += sum(len(text.encode()) for doc in sources.documents(f, column) for _, text in doc)
        else:
            n_bytes += os.path.getsize(f)
    return ids, n_bytes


def windows(n_tokens, seq_len):
    """(start, end) of each window: tokens[start:end] predicts tokens[start + 1:end]."""
    return [(s, min(s + seq_len + 1, n_tokens)) for s in range(0, n_tokens - 1, seq_len)]


@torch.no_grad()
def total_nats(model, ids, seq_len, batch_size=1, device="cpu", progress=False):
    """(summed cross-entropy in nats, tokens predicted) over the windows defined above."""
    from tqdm import tqdm
    spans = windows(len(ids), seq_len)
    full = [s for s in spans if s[1] - s[0] == seq_len + 1]
    batches = [full[i:i + batch_size] for i in range(0, len(full), batch_size)]
    batches += [[s] for s in spans if s[1] - s[0] != seq_len + 1]  # the last, shorter one alone
    loss_fn = ChunkedLoss(model)  # as in training: no (B, T, V) logits
    nats, count = 0.0, 0
    with tqdm(total=len(ids) - 1, unit="tok", desc="evaluating", disable=not progress, file=sys.stderr) as bar:
        for batch in batches:
            rows = torch.from_numpy(np.stack([np.asarray(ids[a:b], dtype=np.int64) for a, b in batch]))
            rows = rows.to(device)
            x, y = rows[:, :-1], rows[:, 1:]
            loss = loss_fn(x, y)  # mean over the batch, in fp32, chunked
            nats += float(loss) * y.numel()
            count += y.numel()
            bar.update(y.numel())
    return nats, count


def evaluate(source, data_spec, seq_len=1024, batch_size=1, device="cpu", progress=False, column="text",
             max_tokens=1_000_000):
    """The JSON record: loss, perplexity, bits_per_byte, tokens, bytes, source."""
    model = SmolLM2.from_pretrained(source, device=device).eval()
    if seq_len > model.config.max_position_embeddings:
        raise EvalError(f"--seq-len {seq_len} exceeds the model's context window of "
                        f"{model.config.max_position_embeddings}")
    ids, n_bytes = load_corpus(data_spec, progress, column, max_tokens)
    if len(ids) < 2:
        raise EvalError(f"--data {data_spec}: {len(ids)} token(s); need at least 2 to predict one")
    nats, count = total_nats(model, ids, seq_len, batch_size, device, progress)
    loss = nats / count
    return {"loss": loss, "perplexity": math.exp(loss), "bits_per_byte": nats / math.log(2) / n_bytes,
            "tokens": count, "bytes": n_bytes, "source": str(source)}


def pick_device(device):
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    kind = device.split(":")[0]
    if kind not in ("cpu", "cuda", "mps") or (kind == "cuda" and not torch.cuda.is_available()) \
            or (kind == "mps" and not torch.backends.mps.is_available()):
        raise EvalError(f"--device {device}: not available here; use auto, cpu, cuda, cuda:N or mps")
    return device


def positive(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def main(argv=None):
    p = OneLineParser(description=__doc__.split("\n")[0])
    p.add_argument("source", help="checkpoint, HF directory, .gguf, .safetensors or hub id")
    p.add_argument("--data", required=True, help="any train.py --data: text, .parquet, .jsonl(.gz) "
                   "files, a directory or glob of them, or hf:NAME[:CONFIG]")
    p.add_argument("--text-column", default="text", help="the text column of parquet/JSONL/hf: rows")
    p.add_argument("--max-tokens", type=positive, default=1_000_000,
                   help="hf: streams only: whole documents from the start up to this many tokens")
    p.add_argument("--seq-len", type=positive, default=1024, help="tokens predicted per window (default 1024)")
    p.add_argument("--batch-size", type=positive, default=1, help="windows per forward pass (default 1)")
    p.add_argument("--device", default="auto", help="auto picks cuda, then mps, then cpu")
    p.add_argument("--json", metavar="OUT", help="also write the result as JSON to this file")
    args = p.parse_args(argv)
    result = evaluate(args.source, args.data, args.seq_len, args.batch_size, pick_device(args.device),
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
    try:
        code = main()
    except (EvalError, data.DataError, ModelLoadError) as e:
        print(f"eval.py: error: {e}", file=sys.stderr)
        code = 2
    sys.exit(code)
