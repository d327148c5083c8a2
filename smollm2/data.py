"""The one door to the data: --data and the validation flags read as text or as conversations
(whichever the rows hold, documents.data_kind) through one path, the kinds differing only in the KINDS
table below (how files are tokenised, which loaders serve them, how validation is held out and
checked). train.py calls load_data and gets a Data; eval.py's loss_eval reads its data with eval_data.
"""
import os
import sys
from dataclasses import dataclass
from typing import Callable

from smollm2.chat import Conversations
from smollm2.chat_loaders import ConversationLoader, ConversationStreamLoader, plan_rows, stream_conversations
from smollm2.checkpoint import data_change
from smollm2.documents import KIND_NAMES, data_kind, documents, is_row_file, is_stream, open_stream, resolve_files
from smollm2.errors import DataError
from smollm2.loaders import DataLoaderLite, StreamLoader, split_train_val, stream_documents
from smollm2.token_cache import dataset_stats, fingerprint, tokenize_conversations, tokenize_corpus


def text_val_problem(val, args):
    """Why text tokens cannot give one validation batch, or None."""
    try:
        DataLoaderLite(val, args.batch_size, args.seq_len)
    except DataError as e:
        return str(e)
    return None


def conversation_val_problem(val, args):
    """Why conversations cannot give one validation row, or None."""
    return None if len(plan_rows(val, args.seq_len)[0]) else "no conversation row carries loss"


@dataclass(frozen=True)
class Kind:
    """What differs between text and conversations on the way from --data to batches."""
    tokenize: Callable  # (files' spec, progress, text column) -> their cached tokens or Conversations
    loader: type  # serves the tokens of files
    stream_loader: type  # serves an hf: stream; its head() reads a stream's first validation tokens
    split: Callable  # (tokens, --val-frac) -> (train, val)
    val_problem: Callable  # (val, args) -> why it cannot validate, or None
    counted: bool  # the log line counts the files' tokens (text), or the loader says what it read


KINDS = {
    "text": Kind(lambda spec, progress, column: tokenize_corpus(spec, progress=progress, text_column=column),
                 DataLoaderLite, StreamLoader, split_train_val, text_val_problem, counted=True),
    "conversations": Kind(lambda spec, progress, column: tokenize_conversations(spec, progress=progress),
                          ConversationLoader, ConversationStreamLoader, Conversations.split,
                          conversation_val_problem, counted=False),
}


@dataclass
class Data:
    """What train.py trains and validates on: the loader, the validation tokens (or Conversations, or
    None), the data's fingerprint (checkpoints record it), and for text files their tokens (the log
    line counts them; None otherwise)."""
    spec: str
    val_spec: str
    tokens: object
    loader: object
    val: object
    fingerprint: str

    def describe(self):
        """The start-up log's "data: ..." line."""
        val = f"validation tokens {len(self.val) if self.val is not None else 0:,}" + \
            (f" from {self.val_spec}" if self.val_spec else "")
        if self.tokens is None:  # a stream (nothing counted ahead), or conversations: the loader says
            return f"data: {self.spec} | {self.loader.describe()} | {val}"
        stats = {"bytes": sum(os.path.getsize(f) for f in resolve_files(self.spec)), **dataset_stats(self.tokens)}
        return (f"data: {self.spec} | {', '.join(f'{k} {v:,}' for k, v in stats.items())} | train batches per "
                f"epoch {self.loader.batches_per_epoch:,}, {val}")

    def change_since(self, ckpt):
        """checkpoint.data_change: the notice when ckpt trained on other data (its loader position is
        then dropped), else None."""
        return data_change(ckpt, self.fingerprint, self.spec)


def read(kind, spec, args, proc):
    """The tokens of spec: a stream's first --val-tokens; files from their cache, rank 0 tokenising
    (or finding the cache) first, the others then reading the cache."""
    if is_stream(spec):
        return kind.stream_loader.head(spec, args.val_tokens, args.text_column)[0]
    if proc.master:
        tokens = kind.tokenize(spec, sys.stderr.isatty(), args.text_column)
    proc.barrier()
    return tokens if proc.master else kind.tokenize(spec, False, args.text_column)


def load_data(args, proc):
    """The Data of --data. Validation: --val-data if given (a stream's first --val-tokens), else the
    tail of file data (--val-frac) or the first --val-tokens of a stream, held out of training."""
    dataset = open_stream(args.data) if is_stream(args.data) else None
    name = data_kind(args.data, args.text_column, dataset)
    if args.val_data and (val_name := data_kind(args.val_data, args.text_column)) != name:
        raise DataError(f"--data {args.data} holds {KIND_NAMES[name]} but --val-data {args.val_data} holds "
                        f"{KIND_NAMES[val_name]}: validate on the kind of data you train on")
    kind, tokens = KINDS[name], None
    val, held = None, f"--val-frac {args.val_frac}"
    if args.val_data:
        val, held = read(kind, args.val_data, args, proc), f"--val-data {args.val_data}"
    if is_stream(args.data):
        loader = kind.stream_loader(args.data, args.batch_size, args.seq_len, proc.rank, proc.world,
                                    args.grad_accum, args.text_column, 0 if args.val_data else args.val_tokens,
                                    group=proc.host_group, dataset=dataset)
        val, held = (val, held) if args.val_data else (loader.val, f"--val-tokens {args.val_tokens}")
    else:
        train = read(kind, args.data, args, proc)
        tokens = train if kind.counted else None
        if val is None and args.val_frac:
            train, val = kind.split(train, args.val_frac)
        loader = kind.loader(train, args.batch_size, args.seq_len, proc.rank, proc.world)
    if val is not None and (problem := kind.val_problem(val, args)):
        raise DataError(f"validation data ({held}) of {args.val_data or args.data}: {problem}; "
                        f"give more, or {held.split()[0]} 0 for no validation")
    return Data(args.data, args.val_data, tokens, loader, val, fingerprint(args.data, column=args.text_column))


def eval_data(spec, column="text", max_tokens=1_000_000, progress=False):
    """eval.py's data, read as train.py reads it: the Conversations of conversation data (an hf:
    stream's first max_tokens tokens of whole ones), else (token ids, UTF-8 bytes of their text): text
    files (their sizes are their bytes), parquet/JSONL rows (the bytes of each row's column), or an
    hf: stream (whole documents from its start until max_tokens; it may be endless)."""
    if data_kind(spec, column) == "conversations":
        return (stream_conversations(spec, max_tokens, column)[0] if is_stream(spec)
                else tokenize_conversations(spec, progress=progress))
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
