"""Loss, perplexity and bits per byte of a model on a text (eval.py), and the validation loss of a
training run. The definition, so numbers compare across tools: the data's token ids t0..tN exactly as
token_cache.py produces them (no BOS added) are cut into windows of seq_len + 1 tokens starting every
seq_len tokens (the last one may be shorter); each window predicts its tokens after the first, so
every token from t1 on is predicted exactly once, from the tokens before it in its window.
loss = mean cross-entropy (nats/token) over them, perplexity = exp(loss), bits per byte = total
nats / ln 2 / the data's UTF-8 bytes (a tokenizer-independent figure, as in nanochat's loss_eval).
Conversations (a 'messages' column, chat.py) are scored otherwise: each one alone in its own window
(its last seq_len + 1 tokens when longer), the loss over its assistant tokens only, bits per byte
over the assistant contents' bytes.
"""
import math
import sys

import numpy as np
import torch

from model import SmolLM2
from smollm2.chat import Conversations
from smollm2.chat_loaders import conversation_batch, plan_rows
from smollm2.chunked_loss import ChunkedLoss
from smollm2.data import eval_data
from smollm2.errors import UsageError
from smollm2.loaders import DataLoaderLite


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


EVAL_BATCH_SIZE = {"cuda": 16}  # windows per pass where --batch-size is not given; 1 elsewhere


def eval_batch_size(device_type):
    """eval.py --data's windows per forward pass: one on a CPU (as fast per token, the least memory), 16
    on a GPU (16 x 1,024 tokens: batch 1 leaves it mostly idle)."""
    return EVAL_BATCH_SIZE.get(device_type, 1)


def evaluate(source, data_spec, seq_len=1024, batch_size=1, device="cpu", progress=False, column="text",
             max_tokens=1_000_000, model=None):
    """eval.py's JSON record: loss, perplexity, bits_per_byte, tokens, bytes, source. On conversations
    (a 'messages' column: files, or an hf: stream's first max_tokens tokens of whole conversations),
    evaluate_conversations' record: the loss over the assistant tokens only. model: source's
    weights already loaded (eval.py's, with its speed-ups), else loaded here."""
    model = model or SmolLM2.from_pretrained(source, device=device).eval()
    if seq_len > model.config.max_position_embeddings:
        raise UsageError(f"--seq-len {seq_len} exceeds the model's context window of "
                        f"{model.config.max_position_embeddings}")
    data = eval_data(data_spec, column, max_tokens, progress)
    if isinstance(data, Conversations):  # assistant tokens only, one conversation at a time
        return evaluate_conversations(model, data, seq_len, device, progress, source)
    ids, n_bytes = data
    if len(ids) < 2:
        raise UsageError(f"--data {data_spec}: {len(ids)} token(s); need at least 2 to predict one")
    nats, count = total_nats(model, ids, seq_len, batch_size, device, progress)
    loss = nats / count
    return {"loss": loss, "perplexity": math.exp(loss), "bits_per_byte": nats / math.log(2) / n_bytes,
            "tokens": count, "bytes": n_bytes, "source": str(source)}


@torch.no_grad()
def conversation_nats(model, conv, seq_len, device="cpu", progress=False):
    """(summed cross-entropy in nats over the tokens that carry the loss, their count, their UTF-8
    bytes) with each conversation scored on its own, in one window: its last seq_len + 1 tokens
    when it is longer (cut from the left: the end of a conversation is the answer being scored)."""
    from tqdm import tqdm
    from smollm2.tokenizer import load_tokenizer
    decode = load_tokenizer().decode
    loss_fn, nats, count, n_bytes = ChunkedLoss(model), 0.0, 0, 0
    for i in tqdm(range(conv.count), unit="conv", desc="evaluating", disable=not progress, file=sys.stderr):
        a, b = int(conv.starts[i]), int(conv.starts[i + 1])
        a = max(a, b - seq_len - 1)
        x, y = conversation_batch(conv, [(a, b)], b - a - 1)
        n = int((y != -1).sum())
        if n == 0:  # its answers were all cut off from the left
            continue
        nats += float(loss_fn(x.to(device), y.to(device))) * n
        count += n
        n_bytes += len(decode(y[y != -1].tolist(), skip_special_tokens=True).encode())
    return nats, count, n_bytes


def evaluate_conversations(model, conv, seq_len, device, progress, source):
    """evaluate()'s record for conversation data: the loss over the assistant tokens only (their
    contents and <|im_end|>), bits per byte over the assistant contents' bytes."""
    nats, count, n_bytes = conversation_nats(model, conv, seq_len, device, progress)
    if count == 0:
        raise UsageError("no assistant token fits --seq-len in these conversations")
    loss = nats / count
    return {"loss": loss, "perplexity": math.exp(loss), "bits_per_byte": nats / math.log(2) / max(n_bytes, 1),
            "tokens": count, "bytes": n_bytes, "conversations": conv.count, "assistant_tokens_only": True,
            "source": str(source)}


@torch.no_grad()
def validation_loss(loss, tokens, batch_size, seq_len, iters, proc, autocast, lockstep=False):
    """train.py's validation loss: the mean of loss(x, y) (a ChunkedLoss) over the first `iters`
    batches of tokens, the same batches every time and under any world size (rank r takes batches
    r, r + world, ...), summed over the ranks. lockstep (FSDP, whose forward gathers weights from
    every rank): every rank runs the same number of forward passes, the spare ones not counted."""
    if isinstance(tokens, Conversations):  # one conversation (or piece) per row: assistant tokens only
        rows = plan_rows(tokens, seq_len)[0]
        n = min(iters, -(-len(rows) // batch_size))
        batches = (conversation_batch(tokens, rows[i * batch_size:(i + 1) * batch_size], seq_len) for i in range(n))
    else:
        loader = DataLoaderLite(tokens, batch_size, seq_len)
        n = min(iters, loader.batches_per_epoch)
        batches = (loader.next_batch() for _ in range(n))
    total = torch.zeros((), device=proc.device)
    loss.model.eval()  # uncompiled, unwrapped: no recompilation, no gradient hooks
    rounds = -(-n // proc.world) * proc.world if lockstep else n
    for i in range(rounds):
        if i < n:
            x, y = (t.to(proc.device) for t in next(batches))
        if i % proc.world == proc.rank:
            with autocast:
                value = loss(x, y)
            if i < n:
                total += value
    loss.model.train()
    return proc.all_sum(total).item() / n
