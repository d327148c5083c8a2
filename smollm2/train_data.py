"""train.py's data: --data and the validation flags wired to the loaders of text (loaders.py) or of
conversations (chat_loaders.py), the layout told by the rows."""
import sys

from smollm2.chat_loaders import (ConversationLoader, ConversationStreamLoader, is_conversation_example, plan_rows,
                                  stream_conversations)
from smollm2.documents import OPEN_ITERATORS, is_stream, next_example, open_stream
from smollm2.errors import DataError
from smollm2.loaders import DataLoaderLite, StreamLoader, split_train_val, stream_head
from smollm2.token_cache import data_layout, tokenize_conversations, tokenize_corpus

LAYOUTS = {"text": "text", "conversations": "conversations (a 'messages' column)"}


def layout(spec, column="text", dataset=None):
    """"conversations" or "text": files by their rows (token_cache.data_layout), a stream by its
    first example (a `messages` field and no text column: conversations)."""
    if not is_stream(spec):
        return data_layout(spec, column)
    dataset = dataset if dataset is not None else open_stream(spec)
    it = iter(dataset)
    OPEN_ITERATORS.add(it)
    example = next_example(it, spec)
    it.close()
    return "conversations" if is_conversation_example(example, column) else "text"


def load_data(args, proc):
    """(the training tokens, or None for a stream; the loader; the validation tokens or None).
    Validation: --val-data if given (a stream's first --val-tokens), else the tail of file data
    (--val-frac) or the first --val-tokens of a stream, held out of training."""
    def corpus(spec):  # rank 0 tokenises (or finds the cache) first; the others then read the cache
        if proc.master:
            tokens = tokenize_corpus(spec, progress=sys.stderr.isatty(), text_column=args.text_column)
        proc.barrier()
        if not proc.master:
            tokens = tokenize_corpus(spec, progress=False, text_column=args.text_column)
        return tokens
    val, held = None, f"--val-frac {args.val_frac}"
    dataset = open_stream(args.data) if is_stream(args.data) else None
    kind = layout(args.data, args.text_column, dataset)
    if args.val_data and (val_kind := layout(args.val_data, args.text_column)) != kind:
        raise DataError(f"--data {args.data} holds {LAYOUTS[kind]} but --val-data {args.val_data} holds "
                        f"{LAYOUTS[val_kind]}: validate on the kind of data you train on")
    if kind == "conversations":
        return load_conversations(args, proc, dataset)
    if args.val_data:
        val, held = (stream_head(args.val_data, args.val_tokens, args.text_column)[0]
                     if is_stream(args.val_data) else corpus(args.val_data)), f"--val-data {args.val_data}"
    if is_stream(args.data):
        tokens = None
        loader = StreamLoader(args.data, args.batch_size, args.seq_len, proc.rank, proc.world,
                              args.grad_accum, args.text_column, 0 if args.val_data else args.val_tokens,
                              group=proc.host_group, dataset=dataset)
        val, held = (val, held) if args.val_data else (loader.val, f"--val-tokens {args.val_tokens}")
    else:
        tokens = train = corpus(args.data)
        if val is None and args.val_frac:
            train, val = split_train_val(tokens, args.val_frac)
        loader = DataLoaderLite(train, args.batch_size, args.seq_len, proc.rank, proc.world)
    if val is not None:
        try:
            DataLoaderLite(val, args.batch_size, args.seq_len)
        except DataError as e:
            raise DataError(f"validation data ({held}) of {args.val_data or args.data}: {e}; "
                            f"give more, or {held.split()[0]} 0 for no validation") from None
    return tokens, loader, val


def load_conversations(args, proc, dataset=None):
    """load_data for conversations, files or an hf: stream: (None, a ConversationLoader or
    ConversationStreamLoader, the validation Conversations or None). None for the tokens: train.py
    then logs the loader's describe(), which says the layout, the share of tokens that carry loss
    and how long conversations were split."""
    def read(spec):
        if is_stream(spec):  # its first --val-tokens tokens of whole conversations
            return stream_conversations(spec, args.val_tokens, args.text_column)[0]
        if proc.master:
            conv = tokenize_conversations(spec, progress=sys.stderr.isatty())
        proc.barrier()
        return conv if proc.master else tokenize_conversations(spec, progress=False)
    val, held = None, f"--val-frac {args.val_frac}"
    if args.val_data:
        val, held = read(args.val_data), f"--val-data {args.val_data}"
    if is_stream(args.data):
        loader = ConversationStreamLoader(args.data, args.batch_size, args.seq_len, proc.rank, proc.world,
                                          args.grad_accum, args.text_column, 0 if args.val_data else args.val_tokens,
                                          group=proc.host_group, dataset=dataset)
        val, held = (val, held) if args.val_data else (loader.val, f"--val-tokens {args.val_tokens}")
    else:
        train = read(args.data)
        if val is None and args.val_frac:
            train, val = train.split(args.val_frac)
        loader = ConversationLoader(train, args.batch_size, args.seq_len, proc.rank, proc.world)
    if val is not None and len(plan_rows(val, args.seq_len)[0]) < 1:
        raise DataError(f"validation data ({held}) of {args.val_data or args.data}: no conversation "
                        f"row carries loss; give more, or {held.split()[0]} 0 for no validation")
    return None, loader, val
