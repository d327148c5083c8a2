"""Loaders, the last stage of the data: (x, y) batches of (B, T) token ids, with a state for exact
resume. DataLoaderLite serves contiguous windows of a token file (token_cache.py), sharded across DDP
ranks the way nanoGPT does; StreamLoader serves an hf: stream (documents.open_stream) with the same
interface, tokenising it on the fly. Conversations: chat_loaders.py; train.py's wiring of --data and
the validation flags to them: data.py.
"""
import hashlib

import numpy as np
import torch

from smollm2.documents import KIND_NAMES, OPEN_ITERATORS, next_example, open_stream, row_text
from smollm2.errors import DataError
from smollm2.tokenizer import EOT_ID, TOKENIZER_DIR, SegmentEncoder, load_tokenizer


def check_shape(batch_size, seq_len, rank, world_size, grad_accum=None):
    """A one-line DataError for a loader shape that cannot be (grad_accum: a stream's lanes)."""
    if batch_size < 1 or seq_len < 1 or not 0 <= rank < world_size or (grad_accum or 1) < 1:
        accum = "" if grad_accum is None else f", grad_accum={grad_accum}"
        raise DataError(f"bad loader shape: batch_size={batch_size}, seq_len={seq_len}, "
                        f"rank={rank}, world_size={world_size}{accum}")


def check_kind(state, conversations):
    """A one-line DataError when a checkpoint's loader state is of the other kind of data."""
    if bool(state.get("conversations")) != conversations:
        said = (KIND_NAMES["text"], KIND_NAMES["conversations"])
        raise DataError(f"the checkpoint trained on {said[not conversations]}, not {said[conversations]}: "
                        "resume it with its own --data")


def split_train_val(tokens, val_frac):
    """(train, val): the last val_frac of the tokens is the validation set (views, no copy)."""
    if not 0 <= val_frac < 1:
        raise DataError(f"val_frac must be in [0, 1), got {val_frac}")
    n_train = len(tokens) - int(len(tokens) * val_frac)
    return tokens[:n_train], tokens[n_train:]


class DataLoaderLite:
    """Contiguous (B, T) windows; each next_batch() on every rank consumes one global batch of
    B*T*world_size tokens, rank r reading the window at position + r*B*T (then +1 for targets).
    So k ranks x 1 call read the same tokens as 1 rank x k calls (gradient accumulation)."""

    conversations = False

    def __init__(self, tokens, batch_size, seq_len, rank=0, world_size=1):
        check_shape(batch_size, seq_len, rank, world_size)
        self.tokens, self.B, self.T = tokens, batch_size, seq_len
        self.rank, self.world_size = rank, world_size
        self.global_batch = batch_size * seq_len * world_size  # tokens consumed per call
        need = self.global_batch + 1
        if len(tokens) < need:
            raise DataError(f"need {need} tokens for batch_size {batch_size} x seq_len {seq_len} x "
                            f"{world_size} rank(s) (+1 target), have {len(tokens)}: use more data "
                            "or a smaller batch/sequence")
        self.position, self.epoch = 0, 0

    @property
    def batches_per_epoch(self):
        """Global batches (calls of next_batch) before the loader wraps to the start."""
        return (len(self.tokens) - 1) // self.global_batch

    def next_batch(self):
        if self.position + self.global_batch + 1 > len(self.tokens):
            self.position, self.epoch = 0, self.epoch + 1
        start = self.position + self.rank * self.B * self.T
        window = np.asarray(self.tokens[start:start + self.B * self.T + 1]).astype(np.int64)
        buf = torch.from_numpy(window)  # only this window leaves the memmap
        self.position += self.global_batch
        return buf[:-1].view(self.B, self.T), buf[1:].view(self.B, self.T)

    def share(self):
        """Nothing to gather: every rank's position is the same (StreamLoader's rank lanes differ)."""

    def state_dict(self):
        return {"position": int(self.position), "epoch": int(self.epoch)}

    def load_state_dict(self, state):
        check_kind(state, self.conversations)
        if "position" not in state:
            raise DataError(f"the checkpoint streamed {state.get('stream')}, not token files: resume "
                            "it with its own --data")
        position = int(state["position"])
        if not 0 <= position <= len(self.tokens):
            raise DataError(f"saved data position {position} is outside these {len(self.tokens)} "
                            "tokens: was the checkpoint trained on other data?")
        self.position, self.epoch = position, int(state["epoch"])


# ----------------------------------------------------------------------------- hub streams
def text_digest(text):
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


class Lane:
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
        OPEN_ITERATORS.add(self.iterator)

    def fill(self, need):
        """Read documents until `need` tokens are buffered."""
        pieces, have, fresh_epoch_tokens = [self.tokens], len(self.tokens), None
        while have < need:
            example = next_example(self.iterator, self.loader.spec)
            self.dataset_state = self.dataset.state_dict()  # resume after this example
            if example is None:  # end of this lane's documents: start it over
                if fresh_epoch_tokens == 0:
                    raise DataError(self.loader.too_few())
                self.epoch += 1
                self._restart()
                fresh_epoch_tokens = 0
                continue
            text = row_text(example, self.loader.column, f"{self.loader.spec} example")
            if self.loader.held_out and text_digest(text) in self.loader.held_out:
                continue  # a validation document
            ids = np.frombuffer(self.loader.encode(text), dtype=np.uint16)
            if self.started:
                ids = np.concatenate([[np.uint16(EOT_ID)], ids]).astype(np.uint16)
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


def stream_documents(spec, n_tokens, column="text", dataset=None, tokenizer_dir=TOKENIZER_DIR):
    """The stream's first whole documents, until they hold n_tokens tokens (EOT between them):
    (their tokens as uint16, the digests of their texts, their texts' UTF-8 bytes)."""
    dataset = dataset if dataset is not None else open_stream(spec)
    encode = SegmentEncoder(load_tokenizer(tokenizer_dir))
    it, pieces, have, digests, n_bytes = iter(dataset), [], 0, set(), 0
    OPEN_ITERATORS.add(it)
    while have < n_tokens:
        example = next_example(it, spec)
        if example is None:
            break
        text = row_text(example, column, f"{spec} example {len(pieces)}")
        ids = np.frombuffer(encode(text), dtype=np.uint16)
        pieces.append(np.concatenate([[np.uint16(EOT_ID)], ids]) if pieces else ids)
        digests.add(text_digest(text))
        have, n_bytes = have + len(pieces[-1]), n_bytes + len(text.encode())
    it.close()
    if not pieces:
        raise DataError(f"{spec}: the stream is empty (no examples in its train split)")
    return np.concatenate(pieces).astype(np.uint16), digests, n_bytes


def stream_head(spec, n_tokens, column="text", dataset=None, tokenizer_dir=TOKENIZER_DIR):
    """(the first n_tokens tokens of the stream as uint16, digests of the documents they come from)."""
    tokens, digests, _ = stream_documents(spec, n_tokens, column, dataset, tokenizer_dir)
    return tokens[:n_tokens], digests


class StreamLoader:
    """DataLoaderLite's interface over a hub stream. The stream is split into lanes = world_size x
    grad_accum runs of disjoint documents (split_dataset_by_node); rank r's micro-step m reads lane
    m * world_size + r. So a step reads one window from every lane whatever the mix of ranks and
    micro-steps: 2 ranks read what 1 process with --grad-accum 2 reads, and a checkpoint resumes under
    any world size with the same lanes. Each rank reads only its own lanes' documents; before a
    checkpoint every rank calls share(), which gathers their (small) lane states over `group` (the
    gloo group of host-side talk: no GPU sync), so rank 0's checkpoint can hold all of them."""

    conversations = False

    def __init__(self, spec, batch_size, seq_len, rank=0, world_size=1, grad_accum=1, column="text",
                 val_tokens=0, tokenizer_dir=None, group=None, dataset=None):
        check_shape(batch_size, seq_len, rank, world_size, grad_accum)
        self.spec, self.column, self.B, self.T = spec, column, batch_size, seq_len
        self.rank, self.world_size, self.lanes = rank, world_size, world_size * grad_accum
        self.dataset = dataset if dataset is not None else open_stream(spec)
        self.tokenizer_dir = tokenizer_dir or TOKENIZER_DIR
        self.tokenizer = load_tokenizer(self.tokenizer_dir)
        self.encode, self.held_out, self.val = SegmentEncoder(self.tokenizer), set(), None
        if val_tokens:  # the first val_tokens tokens are validation; their documents never train
            self.val, self.held_out = self.head(spec, val_tokens, column, self.dataset, self.tokenizer_dir)
        self.mine = [m * world_size + rank for m in range(grad_accum)]  # lane of each micro-step
        self.own = {i: self.lane(self, i) for i in self.mine}
        for lane in self.own.values():  # fail now (empty stream, bad column), not at step 1
            lane.fill(self.first_fill())
        self.calls, self.others, self.group, self.shared = 0, {}, group, False
        self.share()

    lane = Lane  # what a lane is, and how validation is read: a subclass (chat_loaders) changes them
    head = staticmethod(stream_head)

    def first_fill(self):
        """What a lane holds before the first step: the tokens of one batch (and its last target)."""
        return self.B * self.T + 1

    ITEMS, LANE_GETS = "documents", "documents"  # what the stream holds, what a lane may get none of

    def too_few(self):
        if self.lanes == 1 and not self.held_out:
            return f"{self.spec}: the stream is empty (no {self.ITEMS} in its train split)"
        return (f"{self.spec}: a lane of {self.lanes} (world size x grad accum) gets no {self.LANE_GETS}"
                f"{f' once the validation {self.ITEMS} are held out' if self.held_out else ''}; "
                f"the stream has too few {self.ITEMS} for this many lanes")

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
        self.shared = False
        return buf[:-1].view(self.B, self.T), buf[1:].view(self.B, self.T)

    def share(self):
        """Gather every rank's lane states (all ranks call it, between steps, before a checkpoint)."""
        import torch.distributed as dist
        if self.world_size > 1 and dist.is_initialized():
            mine = {i: lane.state_dict() for i, lane in self.own.items()}
            everyone = [None] * self.world_size
            dist.all_gather_object(everyone, mine, group=self.group)
            self.others = {i: s for states in everyone for i, s in states.items() if i not in self.own}
        self.shared = True

    def state_dict(self):
        if self.calls % len(self.mine):
            raise RuntimeError("a stream's state is only whole between optimizer steps")
        if self.world_size > 1 and not self.shared:
            raise RuntimeError("share() the lanes' states on every rank before saving a stream's state")
        states = {**self.others, **{i: lane.state_dict() for i, lane in self.own.items()}}
        return {"stream": self.spec, "column": self.column,
                "lanes": [states.get(i) for i in range(self.lanes)]}

    def load_state_dict(self, state):
        check_kind(state, self.conversations)
        if "lanes" not in state:
            raise DataError(f"the checkpoint trained on token files, not a stream: resume it "
                            f"with its own --data, not {self.spec}")
        if state["stream"] != self.spec or state["column"] != self.column:
            raise DataError(f"the checkpoint streamed {state['stream']} (column {state['column']!r}), "
                            f"not {self.spec} (column {self.column!r}): resume with its --data")
        if len(state["lanes"]) != self.lanes:
            raise DataError(f"the checkpoint read {len(state['lanes'])} lanes of {state['stream']}; "
                            f"this run has {self.lanes} (world size x --grad-accum): keep their "
                            "product as it was for an exact resume")
        if any(state["lanes"][i] is None for i in self.own):  # saved by ranks that never shared
            raise DataError(f"the checkpoint lacks some lanes of {self.spec}: it was not saved "
                            "by a run of train.py")
        for i, lane in self.own.items():
            lane.load_state_dict(state["lanes"][i])
        self.others = {i: s for i, s in enumerate(state["lanes"]) if i not in self.own}
        self.calls, self.shared = 0, True
