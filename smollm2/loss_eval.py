"""Loss, perplexity and bits per byte of a model on a text (eval.py), and the validation loss of a
training run. The definition, so numbers compare across tools: the data's token ids t0..tN exactly as
token_cache.py produces them (no BOS added) are cut into windows of seq_len + 1 tokens starting every
seq_len tokens (the last one may be shorter); each window predicts its tokens after the first, so
every token from t1 on is predicted exactly once, from the tokens before it in its window.
loss = mean cross-entropy (nats/token) over them, perplexity = exp(loss), bits per byte = total
nats / ln 2 / the data's UTF-8 bytes (a tokenizer-independent figure, as in nanochat's loss_eval).
"""
import math
import os
import sys

import numpy as np
import torch

from model import SmolLM2
from smollm2.chunked_loss import ChunkedLoss
from smollm2.documents import documents, is_row_file, is_stream, resolve_files
from smollm2.errors import UsageError
from smollm2.loaders import DataLoaderLite, stream_documents
from smollm2.token_cache import tokenize_corpus


def load_corpus(spec, progress=False, column="text", max_tokens=1_000_000):
    """(token ids, UTF-8 bytes of their text) of a data source exactly as train.py reads it: text
    files (their sizes are their bytes), parquet/JSONL rows (the bytes of each row's column), or an
    hf: stream (whole documents from its start until max_tokens; it may be endless)."""
    if is_stream(spec):  # a reading error: one DataError line
        tokens, _, n_bytes = stream_documents(spec, max_tokens, column)
        return tokens, n_bytes
    ids = tokenize_corpus(spec, progress=progress, text_column=column)
    n_bytes = 0
    for f in resolve_files(spec):
        if is_row_file(f):
            n_bytes += sum(len(text.encode()) for doc in documents(f, column) for _, text in doc)
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
    """eval.py's JSON record: loss, perplexity, bits_per_byte, tokens, bytes, source."""
    model = SmolLM2.from_pretrained(source, device=device).eval()
    if seq_len > model.config.max_position_embeddings:
        raise UsageError(f"--seq-len {seq_len} exceeds the model's context window of "
                        f"{model.config.max_position_embeddings}")
    ids, n_bytes = load_corpus(data_spec, progress, column, max_tokens)
    if len(ids) < 2:
        raise UsageError(f"--data {data_spec}: {len(ids)} token(s); need at least 2 to predict one")
    nats, count = total_nats(model, ids, seq_len, batch_size, device, progress)
    loss = nats / count
    return {"loss": loss, "perplexity": math.exp(loss), "bits_per_byte": nats / math.log(2) / n_bytes,
            "tokens": count, "bytes": n_bytes, "source": str(source)}


@torch.no_grad()
def validation_loss(loss, tokens, batch_size, seq_len, iters, proc, autocast, lockstep=False):
    """train.py's validation loss: the mean of loss(x, y) (a ChunkedLoss) over the first `iters`
    batches of tokens, the same batches every time and under any world size (rank r takes batches
    r, r + world, ...), summed over the ranks. lockstep (FSDP, whose forward gathers weights from
    every rank): every rank runs the same number of forward passes, the spare ones not counted."""
    loader = DataLoaderLite(tokens, batch_size, seq_len)
    n = min(iters, loader.batches_per_epoch)
    total = torch.zeros((), device=proc.device)
    loss.model.eval()  # uncompiled, unwrapped: no recompilation, no gradient hooks
    rounds = -(-n // proc.world) * proc.world if lockstep else n
    for i in range(rounds):
        if i < n:
            x, y = (t.to(proc.device) for t in loader.next_batch())
        if i % proc.world == proc.rank:
            with autocast:
                value = loss(x, y)
            if i < n:
                total += value
    loss.model.train()
    return proc.all_sum(total).item() / n
