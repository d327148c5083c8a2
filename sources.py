"""Where training documents come from: text, parquet and JSONL files, and hub datasets streamed.

documents() reads one file as a run of documents, each an iterator of text pieces, for data.py to
tokenise and cache: a text file is one document; each row of a .parquet file (read one row group at a
time with pyarrow) or line of a .jsonl / .jsonl.gz file is one, its text in the --text-column.

hf:NAME[:CONFIG] (or hf:./folder of parquet/JSONL shards) is streamed with `datasets` instead,
tokenised on the fly, never cached nor downloaded whole. StreamLoader serves its (x, y) batches
with DataLoaderLite's interface and an exact-resume state: each lane's IterableDataset.state_dict()
plus the tokens it read but has not yet served.
"""
import atexit
import codecs
import gzip
import hashlib
import json
import os
import weakref

import numpy as np
import torch

import data  # data imports us too: only its attributes at call time, never at import

ROW_SUFFIXES = (".parquet", ".jsonl", ".jsonl.gz")  # files whose rows (lines) are the documents
ROW_GROUP_SLICE = 4096  # rows turned into Python strings at a time


def is_stream(spec):
    return str(spec).startswith("hf:")


def is_row_file(path):
    return path.endswith(ROW_SUFFIXES)


def documents(path, column="text", chunk_bytes=None):
    """Yield each document of the file as an iterable of (bytes of the file read, text piece)."""
    chunk_bytes = chunk_bytes or data.CHUNK_BYTES
    if path.endswith(".parquet"):
        yield from _parquet_documents(path, column)
    elif path.endswith((".jsonl", ".jsonl.gz")):
        yield from _jsonl_documents(path, column)
    else:
        yield text_pieces(path, chunk_bytes)


# ----------------------------------------------------------------------------- text files
def text_pieces(path, chunk_bytes):
    """Yield (bytes read since the last piece, text) with pieces of about chunk_bytes, cut only
    at safe places (data._CUT). Raises DataError at the first NUL byte or invalid UTF-8. Text
    without a safe cut (no space or newline between words) stays one piece: slow, but still exact."""
    offset, pending, carry, n_read = 0, b"", "", 0  # offset: where pending starts in the file
    with open(path, "rb") as f:
        while True:
            block = f.read(max(chunk_bytes, len(carry)))  # no cut yet: read more each time
            n_read += len(block)
            raw, final = pending + block, not block
            text, consumed = _decode(raw, final, path, offset)
            text = carry + text
            offset, pending = offset + consumed, raw[consumed:]  # pending: half a character
            if final:  # end of file: what is left is the last piece
                cut = len(text)
            else:  # look in the second half for a cut, and never rescan a long carry
                m = data._CUT.search(text, max(len(text) // 2, len(carry) - 2))
                cut = m.start() if m else 0
            carry = text[cut:]
            if cut:
                yield n_read, text[:cut]
                n_read = 0
            if final:
                return


def _decode(raw, final, path, offset):
    """(text, bytes consumed): UTF-8 text, leaving a character cut off at the end unless final."""
    nul = raw.find(b"\0")
    if nul >= 0:
        raise data.DataError(f"{path} looks binary (NUL byte at offset {offset + nul}); "
                             "expected UTF-8 text")
    try:
        return codecs.utf_8_decode(raw, "strict", final)
    except UnicodeDecodeError as e:
        where = offset + e.start
        raise data.DataError(f"{path} is not UTF-8 text (bad byte at offset {where})") from None


# ----------------------------------------------------------------------------- row files
def row_text(row, column, where):
    """The document text of one row (a JSONL object or a hub example), or a DataError saying where."""
    if not isinstance(row, dict):
        raise data.DataError(f"{where}: expected a JSON object with a {column!r} field, "
                             f"got {type(row).__name__}")
    if column not in row:
        raise data.DataError(f"{where}: no {column!r} field (it has: {', '.join(row) or 'none'}); "
                             "name the text field with --text-column")
    text = row[column]
    if not isinstance(text, str):
        raise data.DataError(f"{where}: {column!r} is {type(text).__name__}, expected a string")
    return text


def _parquet_documents(path, column):
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise data.DataError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
    try:
        file = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise data.DataError(f"{path} is not a readable parquet file ({str(e)[:120]})") from None
    schema = file.schema_arrow
    if column not in schema.names:
        raise data.DataError(f"{path} has no column {column!r} (its columns: {', '.join(schema.names)}); "
                             "name the text column with --text-column")
    kind = schema.field(column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)
            or getattr(pa.types, "is_string_view", lambda _: False)(kind)):
        raise data.DataError(f"{path}: column {column!r} holds {kind}, expected strings")
    size, groups, row = os.path.getsize(path), file.num_row_groups, 0
    for g in range(groups):  # one row group of one column in RAM at a time
        texts = file.read_row_group(g, columns=[column]).column(0)
        share = size * (g + 1) // groups - size * g // groups  # progress: bytes of this group
        for start in range(0, len(texts), ROW_GROUP_SLICE):
            for text in texts.slice(start, ROW_GROUP_SLICE).to_pylist():
                if text is None:
                    raise data.DataError(f"{path} row {row}: {column!r} is null, expected a string")
                yield ((share, text),)
                share, row = 0, row + 1
        del texts


def _jsonl_documents(path, column):
    with open(path, "rb") as raw:
        lines = gzip.GzipFile(fileobj=raw) if path.endswith(".gz") else raw
        done, lineno = 0, 0
        try:
            for lineno, line in enumerate(lines, 1):
                if not line.strip():  # blank lines (a trailing one, say) hold no document
                    continue
                where = f"{path} line {lineno}"
                try:
                    row = json.loads(line)
                except UnicodeDecodeError:
                    raise data.DataError(f"{where}: not UTF-8") from None
                except ValueError as e:
                    raise data.DataError(f"{where}: not JSON ({getattr(e, 'msg', e)})") from None
                text = row_text(row, column, where)
                read, done = raw.tell() - done, raw.tell()
                yield ((read, text),)
        except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
            raise data.DataError(f"{path} line {lineno + 1}: unreadable ({e})") from None


# ----------------------------------------------------------------------------- hub streams
_OPEN_ITERATORS = weakref.WeakSet()


@atexit.register
def _close_iterators():
    """Close live dataset iterators while the interpreter is whole: left to its teardown,
    datasets' parquet generator prints an ignored AttributeError on stderr."""
    for it in list(_OPEN_ITERATORS):
        it.close()


def open_stream(spec):
    """The IterableDataset of hf:NAME[:CONFIG] (its train split), or a one-line DataError."""
    name, _, config = spec[len("hf:"):].partition(":")
    if not name:
        raise data.DataError(f"{spec}: expected hf:NAME[:CONFIG], e.g. hf:HuggingFaceTB/"
                             "smollm-corpus:cosmopedia-v2, or hf:./folder of parquet/JSONL shards")
    local = name.startswith((".", "/", "~"))
    if local and not os.path.isdir(os.path.expanduser(name)):
        raise data.DataError(f"{spec}: no such directory {name}")
    try:
        import datasets
    except ImportError:
        raise data.DataError(f"{spec}: hf: sources need the datasets package "
                             "(pip install datasets)") from None
    from datasets.data_files import EmptyDatasetError
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its errors reach us as exceptions,
    try:  # which we report in one line: its log lines would only repeat them on stderr
        if local:  # only the shards: a token cache or a README beside them is no data
            return _load_local(datasets, os.path.expanduser(name), spec)
        return datasets.load_dataset(name, config or None, split="train", streaming=True)
    except data.DataError:
        raise
    except (EmptyDatasetError, StopIteration) as e:  # no data files; files of no rows
        raise data.DataError(f"{spec}: the stream is empty ({_reason(e)})") from None
    except Exception as e:  # the library raises many kinds (hub, config, file errors): say which
        raise data.DataError(f"{spec}: cannot stream it ({_reason(e)})") from None


def _load_local(datasets, folder, spec):
    """A local folder's parquet or JSONL shards (sorted, any depth) through the same streaming path
    as a hub dataset, with nothing else in the folder taken for data."""
    shards = sorted(os.path.join(root, n) for root, _, names in os.walk(folder) for n in names
                    if is_row_file(n) and not n.startswith("."))
    kinds = {"parquet" if f.endswith(".parquet") else "json" for f in shards}
    if len(kinds) > 1:
        raise data.DataError(f"{spec}: mixes parquet and JSONL shards; keep one kind per folder")
    if not shards:
        raise data.DataError(f"{spec}: the stream is empty (no .parquet, .jsonl or .jsonl.gz files in it)")
    return datasets.load_dataset(kinds.pop(), data_files={"train": shards}, split="train", streaming=True)


def _reason(e):
    """The library's reason in a few words: the exception's kind and its message's first line."""
    message = str(e).strip()
    return f"{type(e).__name__}: {message.splitlines()[0][:160]}" if message else type(e).__name__


def _digest(text):
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


class _Lane:
    """One run of disjoint documents (split_dataset_by_node with `lanes` nodes) as a token stream,
    documents separated by <|endoftext|>; starts over at its end."""

    def __init__(self, loader, index):
        self.loader, self.index = loader, index
        self.tokens, self.started, self.epoch = np.zeros(0, np.uint16), False, 0
        self._restart()

    def _restart(self, dataset_state=None):
        from datasets.distributed import split_dataset_by_node
        self.dataset = split_dataset_by_node(self.loader.dataset, rank=self.index,
                                             world_size=self.loader.lanes)
        if dataset_state is not None:
            self.dataset.load_state_dict(dataset_state)
        # Kept by us: until its first example, a loaded dataset's state_dict() is its initial one
        self.dataset_state = dataset_state or self.dataset.state_dict()
        self.iterator = iter(self.dataset)
        _OPEN_ITERATORS.add(self.iterator)

    def fill(self, need):
        """Read documents until `need` tokens are buffered."""
        pieces, have, fresh_epoch_tokens = [self.tokens], len(self.tokens), None
        while have < need:
            example = _next(self.iterator, self.loader.spec)
            self.dataset_state = self.dataset.state_dict()  # resume after this example
            if example is None:  # end of this lane's documents: start it over
                if fresh_epoch_tokens == 0:
                    raise data.DataError(self.loader.too_few())
                self.epoch += 1
                self._restart()
                fresh_epoch_tokens = 0
                continue
            text = row_text(example, self.loader.column, f"{self.loader.spec} example")
            if self.loader.held_out and _digest(text) in self.loader.held_out:
                continue  # a validation document
            ids = np.frombuffer(self.loader.encode(text), dtype=np.uint16)
            if self.started:
                ids = np.concatenate([[np.uint16(data.EOT_ID)], ids]).astype(np.uint16)
            self.started = True
            pieces.append(ids)
            have += len(ids)
            if fresh_epoch_tokens is not None:
                fresh_epoch_tokens += len(ids)
        self.tokens = np.concatenate(pieces) if len(pieces) > 1 else self.tokens

    def state_dict(self):
        return {"dataset": self.dataset_state, "tokens": self.tokens.tobytes(),  # uint16
                "started": self.started, "epoch": self.epoch}

    def load_state_dict(self, state):
        self.iterator.close()
        self.tokens = np.frombuffer(state["tokens"], dtype=np.uint16).copy()
        self.started, self.epoch = bool(state["started"]), int(state["epoch"])
        self._restart(state["dataset"])


def _next(iterator, spec):
    try:
        return next(iterator, None)
    except Exception as e:
        raise data.DataError(f"{spec}: reading the stream failed ({_reason(e)})") from None


def stream_documents(spec, n_tokens, column="text", dataset=None, tokenizer=None):
    """The stream's first whole documents, until they hold n_tokens tokens (EOT between them):
    (their tokens as uint16, the digests of their texts, their texts' UTF-8 bytes)."""
    dataset = dataset if dataset is not None else open_stream(spec)
    encode = data._SegmentEncoder(tokenizer or data.load_tokenizer())
    it, pieces, have, digests, n_bytes = iter(dataset), [], 0, set(), 0
    _OPEN_ITERATORS.add(it)
    while have < n_tokens:
        example = _next(it, spec)
        if example is None:
            break
        text = row_text(example, column, f"{spec} example {len(pieces)}")
        ids = np.frombuffer(encode(text), dtype=np.uint16)
        pieces.append(np.concatenate([[np.uint16(data.EOT_ID)], ids]) if pieces else ids)
        digests.add(_digest(text))
        have, n_bytes = have + len(pieces[-1]), n_bytes + len(text.encode())
    it.close()
    if not pieces:
        raise data.DataError(f"{spec}: the stream is empty (no examples in its train split)")
    return np.concatenate(pieces).astype(np.uint16), digests, n_bytes


def stream_head(spec, n_tokens, column="text", dataset=None, tokenizer=None):
    """(the first n_tokens tokens of the stream as uint16, digests of the documents they come from)."""
    tokens, digests, _ = stream_documents(spec, n_tokens, column, dataset, tokenizer)
    return tokens[:n_tokens], digests


class StreamLoader:
    """DataLoaderLite's interface over a hub stream. The stream is split into lanes = world_size x
    grad_accum runs of disjoint documents (split_dataset_by_node); rank r's micro-step m reads lane
    m * world_size + r. So a step reads one window from every lane whatever the mix of ranks and
    micro-steps: 2 ranks read what 1 process with --grad-accum 2 reads, and a checkpoint resumes under
    any world size with the same lanes. Each rank reads only its own lanes' documents; after each step
    the ranks share their (small) lane states, so rank 0's checkpoint can hold all of them."""

    def __init__(self, spec, batch_size, seq_len, rank=0, world_size=1, grad_accum=1, column="text",
                 val_tokens=0, tokenizer_dir=None):
        if batch_size < 1 or seq_len < 1 or not 0 <= rank < world_size or grad_accum < 1:
            raise data.DataError(f"bad loader shape: batch_size={batch_size}, seq_len={seq_len}, "
                                 f"rank={rank}, world_size={world_size}, grad_accum={grad_accum}")
        self.spec, self.column, self.B, self.T = spec, column, batch_size, seq_len
        self.rank, self.world_size, self.lanes = rank, world_size, world_size * grad_accum
        self.dataset = open_stream(spec)
        tokenizer = data.load_tokenizer(tokenizer_dir or data.DEFAULT_TOKENIZER)
        self.encode, self.held_out, self.val = data._SegmentEncoder(tokenizer), set(), None
        if val_tokens:  # the first val_tokens tokens are validation; their documents never train
            self.val, self.held_out = stream_head(spec, val_tokens, column, self.dataset, tokenizer)
        self.mine = [m * world_size + rank for m in range(grad_accum)]  # lane of each micro-step
        self.own = {i: _Lane(self, i) for i in self.mine}
        for lane in self.own.values():  # fail now (empty stream, bad column), not at step 1
            lane.fill(self.B * self.T + 1)
        self.calls, self.others = 0, {}
        self._share()

    def too_few(self):
        if self.lanes == 1 and not self.held_out:
            return f"{self.spec}: the stream is empty (no documents in its train split)"
        return (f"{self.spec}: a lane of {self.lanes} (world size x grad accum) gets no documents"
                f"{' once the validation documents are held out' if self.held_out else ''}; "
                "the stream has too few documents for this many lanes")

    def describe(self):
        return (f"streamed, no cache | {self.lanes} lane(s) of disjoint documents (world size x grad "
                f"accum), each starts over at its end")

    @property
    def batches_per_epoch(self):
        return None  # a stream is not counted ahead

    def next_batch(self):
        lane = self.own[self.mine[self.calls % len(self.mine)]]
        n = self.B * self.T
        lane.fill(n + 1)
        buf = torch.from_numpy(lane.tokens[:n + 1].astype(np.int64))
        lane.tokens = lane.tokens[n:]  # the last target is the next window's first input
        self.calls += 1
        if self.calls % len(self.mine) == 0:  # a step is done: checkpoints come between steps
            self._share()
        return buf[:-1].view(self.B, self.T), buf[1:].view(self.B, self.T)

    def _share(self):
        import torch.distributed as dist
        if self.world_size > 1 and dist.is_initialized():
            mine = {i: lane.state_dict() for i, lane in self.own.items()}
            everyone = [None] * self.world_size
            dist.all_gather_object(everyone, mine)
            self.others = {i: s for states in everyone for i, s in states.items() if i not in self.own}

    def state_dict(self):
        if self.calls % len(self.mine):
            raise RuntimeError("a stream's state is only whole between optimizer steps")
        states = {**self.others, **{i: lane.state_dict() for i, lane in self.own.items()}}
        return {"stream": self.spec, "column": self.column,
                "lanes": [states.get(i) for i in range(self.lanes)]}

    def load_state_dict(self, state):
        if "lanes" not in state:
            raise data.DataError(f"the checkpoint trained on token files, not a stream: resume it "
                                 f"with its own --data, not {self.spec}")
        if state["stream"] != self.spec or state["column"] != self.column:
            raise data.DataError(f"the checkpoint streamed {state['stream']} (column {state['column']!r}), "
                                 f"not {self.spec} (column {self.column!r}): resume with its --data")
        if len(state["lanes"]) != self.lanes:
            raise data.DataError(f"the checkpoint read {len(state['lanes'])} lanes of {state['stream']}; "
                                 f"this run has {self.lanes} (world size x --grad-accum): keep their "
                                 "product as it was for an exact resume")
        if any(state["lanes"][i] is None for i in self.own):  # saved by ranks that never shared
            raise data.DataError(f"the checkpoint lacks some lanes of {self.spec}: it was not saved "
                                 "by a run of train.py")
        for i, lane in self.own.items():
            lane.load_state_dict(state["lanes"][i])
        self.others = {i: s for i, s in enumerate(state["lanes"]) if i not in self.own}
        self.calls = 0
