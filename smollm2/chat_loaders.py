"""Conversations batched for training: rows (a conversation, or a piece of a long one split at turn
boundaries) packed one after another into the lines of (x, y, doc) batches, each attending only to
itself (model.hidden_states's doc), targets only on the assistant tokens (chat.py's mask).
ConversationLoader serves the cached conversation files (token_cache.py), ConversationStreamLoader an
hf: stream of them (loaders.StreamLoader's lanes); conversation_batch gives validation and eval.py
one conversation per row, each scored on its own.
"""
import numpy as np
import torch

from smollm2.chat import Conversations, chat_template, check_messages, encode_conversations, is_conversation_example
from smollm2.documents import OPEN_ITERATORS, next_example, open_stream
from smollm2.errors import DataError
from smollm2.loaders import Lane, StreamLoader, check_kind, check_shape, text_digest
from smollm2.tokenizer import EOT_ID, TOKENIZER_DIR, load_tokenizer

IM_START_ID = 1  # <|im_start|>: where a turn begins, the place to split a long conversation


def plan_rows(conv, seq_len):
    """(rows, notes): rows is an (n, 2) array of token spans [a, b) of conv, at most seq_len + 1
    tokens each (a row's inputs are its tokens but the last, its targets all but the first): a
    conversation or a piece of one, each with at least one target that carries the loss. A
    conversation longer than that is split before a turn's <|im_start|> where one fits, else cut
    inside a turn (the next piece then starts at the cut's last token, so no target is lost).
    notes: {"split": conversations split, "pieces": their rows, "cut_in_turn": cuts inside a turn}."""
    starts, limit = conv.starts, seq_len + 1
    lengths = np.diff(starts)
    rows = [np.stack([starts[:-1], starts[1:]], 1)[lengths <= limit]]
    notes = {"split": 0, "pieces": 0, "cut_in_turn": 0}
    turn_starts = None
    for i in np.flatnonzero(lengths > limit):
        if turn_starts is None:
            turn_starts = np.flatnonzero(np.asarray(conv.tokens) == IM_START_ID)
        a, end = int(starts[i]), int(starts[i + 1])
        notes["split"] += 1
        pieces = []
        while end - a > limit:
            j = np.searchsorted(turn_starts, a + limit, "right") - 1
            if j >= 0 and turn_starts[j] > a + 1:
                b = nxt = int(turn_starts[j])
            else:
                b, nxt = a + limit, a + limit - 1
                notes["cut_in_turn"] += 1
            pieces.append((a, b))
            a = nxt
        pieces.append((a, end))
        notes["pieces"] += len(pieces)
        rows.append(np.array(pieces, dtype=np.int64))
    rows = np.concatenate(rows) if rows else np.zeros((0, 2), np.int64)
    rows = rows[np.argsort(rows[:, 0], kind="stable")]
    trained = np.concatenate([[0], np.cumsum(np.asarray(conv.mask, dtype=np.int64))])
    return rows[trained[rows[:, 1]] - trained[rows[:, 0] + 1] > 0], notes


def conversation_batch(conv, rows, seq_len):
    """(x, y) of (len(rows), seq_len): one row of conv per batch row, from the left, padded with
    <|endoftext|>; y the next token where it carries the loss, -1 elsewhere (the padding included).
    Validation and eval.py score conversations so, each on its own."""
    return packed_batch([[(conv.tokens[a:b], conv.mask[a:b])] for a, b in rows], seq_len)[:2]


def pack(lengths, limit):
    """Lines of a packed batch: [[indices]], the pieces of `lengths` in their order, each line the
    pieces that fit in `limit` tokens one after another (a piece that does not fit starts the next)."""
    lines, line, used = [], [], 0
    for i, n in enumerate(lengths):
        if line and used + n > limit:
            lines.append(line)
            line, used = [], 0
        line.append(i)
        used += n
    return lines + [line] if line else lines


def packed_batch(lines, seq_len):
    """(x, y, doc) of (len(lines), seq_len) from lines of pieces [(token ids, loss mask)] of at most
    seq_len + 1 tokens together: the pieces of a line one after another, then <|endoftext|> padding;
    y the next token where it is the same piece's and carries the loss, else -1; doc numbers the pieces
    (the padding after them too), so attention stays inside each (model.hidden_states)."""
    x = torch.full((len(lines), seq_len + 1), EOT_ID, dtype=torch.long)
    y = torch.full((len(lines), seq_len + 1), -1, dtype=torch.long)
    doc = torch.zeros((len(lines), seq_len + 1), dtype=torch.long)
    for r, pieces in enumerate(lines):
        at = 0
        for d, (tokens, mask) in enumerate(pieces):
            ids = torch.from_numpy(np.asarray(tokens).astype(np.int64))
            keep = torch.from_numpy(np.asarray(mask[1:]).astype(bool))
            x[r, at:at + len(ids)] = ids
            y[r, at:at + len(ids) - 1] = torch.where(keep, ids[1:], -1)
            doc[r, at:at + len(ids)] = d
            at += len(ids)
        doc[r, at:] = len(pieces)
    return x[:, :-1], y[:, :-1], doc[:, :-1]


class ConversationLoader:
    """DataLoaderLite's interface over conversations: their rows (plan_rows: a conversation, or a
    piece of a long one) packed one after another into the (B, T) batch's lines, each attending only
    to itself (doc, model.hidden_states): packing measured 3x the loss-carrying tokens a second of one
    row per line, padded, at the same loss (bench/chat_batching.py). Targets are -1 except on the
    tokens that carry the loss. Each epoch packs the rows in a new shuffled order (seeded by the
    epoch: exact resume); each next_batch() on every rank consumes B * world_size lines, rank r taking
    the r-th B of them, so k ranks x 1 call read the lines 1 rank x k calls reads."""

    conversations = True

    def __init__(self, conv, batch_size, seq_len, rank=0, world_size=1, seed=0):
        check_shape(batch_size, seq_len, rank, world_size)
        self.conv, self.B, self.T, self.seed = conv, batch_size, seq_len, seed
        self.rank, self.world_size = rank, world_size
        self.rows, self.notes = plan_rows(conv, seq_len)
        self.global_rows = batch_size * world_size
        self.position, self.epoch = 0, 0
        self.lines = self._lines(0)
        if len(self.lines) < self.global_rows:
            raise DataError(f"need {self.global_rows} packed rows of --seq-len {seq_len} for batch_size "
                            f"{batch_size} x {world_size} rank(s), the conversations fill {len(self.lines)}: "
                            "use more conversations or a smaller batch")

    def _lines(self, epoch):
        """The epoch's lines: arrays of indices into rows, packed in the epoch's shuffled order."""
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.rows))
        lengths = self.rows[order, 1] - self.rows[order, 0]
        return [order[line] for line in pack(lengths, self.T + 1)]

    @property
    def batches_per_epoch(self):
        return len(self.lines) // self.global_rows

    def loss_tokens(self):
        """Tokens of the rows' targets that carry the loss."""
        trained = np.concatenate([[0], np.cumsum(np.asarray(self.conv.mask, dtype=np.int64))])
        return int((trained[self.rows[:, 1]] - trained[self.rows[:, 0] + 1]).sum())

    def describe(self):
        """The data's log line after its name."""
        n = self.notes
        split = (f"{n['split']:,} longer than --seq-len {self.T} split into {n['pieces']:,} pieces at turn "
                 f"boundaries ({n['cut_in_turn']:,} cut inside a turn)" if n["split"]
                 else f"none longer than --seq-len {self.T}")
        return (f"{self.conv.describe()} | packed, each attending only to itself: {split}; {len(self.rows):,} "
                f"pieces in {len(self.lines):,} rows of {self.T}, "
                f"{self.loss_tokens() / (len(self.lines) * self.T):.1%} "
                f"of their tokens carry loss | train batches per epoch {self.batches_per_epoch:,}")

    def next_batch(self):
        if self.position + self.global_rows > len(self.lines):
            self.position, self.epoch = 0, self.epoch + 1
            self.lines = self._lines(self.epoch)
        start = self.position + self.rank * self.B
        self.position += self.global_rows
        return packed_batch([[(self.conv.tokens[a:b], self.conv.mask[a:b]) for a, b in self.rows[line]]
                             for line in self.lines[start:start + self.B]], self.T)

    def share(self):
        """Nothing to gather: every rank's position is the same."""

    def state_dict(self):
        return {"conversations": True, "packed": True, "position": int(self.position), "epoch": int(self.epoch),
                "rows": int(len(self.rows)), "seed": int(self.seed)}

    def load_state_dict(self, state):
        check_kind(state, self.conversations)
        if "lanes" in state:
            raise DataError(f"the checkpoint streamed the conversations of {state['stream']}, not "
                            "conversation files: resume it with its own --data")
        if int(state["rows"]) != len(self.rows) or not state.get("packed"):
            raise DataError(f"the checkpoint's conversations made {state['rows']} rows, these make "
                            f"{len(self.rows)}: was it trained on other data or another --seq-len?")
        self.position, self.epoch, self.seed = int(state["position"]), int(state["epoch"]), int(state["seed"])
        self.lines = self._lines(self.epoch)


# ----------------------------------------------------------------------------- hf: streams of conversations
def example_turns(example, column, where):
    """The (role, content) turns of a conversation stream's example, or a one-line DataError."""
    if not is_conversation_example(example, column):
        fields = ", ".join(k for k, v in example.items() if v is not None) if isinstance(example, dict) else ""
        got = f"its fields: {fields or 'none'}" if isinstance(example, dict) else type(example).__name__
        raise DataError(f"{where}: no 'messages' field ({got}); a stream of conversations has one on "
                        "every example")
    return check_messages(example["messages"], where)


def stream_conversations(spec, n_tokens, column="text", dataset=None, tokenizer_dir=TOKENIZER_DIR):
    """The stream's first whole conversations with an assistant turn, until they hold n_tokens
    tokens: (their Conversations, the digests of their rendered texts). Those without an assistant
    turn are skipped and counted (Conversations.skipped)."""
    dataset = dataset if dataset is not None else open_stream(spec)
    tokenizer, template = load_tokenizer(tokenizer_dir), chat_template(tokenizer_dir)
    it, pieces, have, digests, skipped, n = iter(dataset), [], 0, set(), 0, 0
    OPEN_ITERATORS.add(it)
    while have < n_tokens:
        example = next_example(it, spec)
        if example is None:
            break
        turns = example_turns(example, column, f"{spec} example {n}")
        n += 1
        if not any(role == "assistant" for role, _ in turns):
            skipped += 1
            continue
        (ids, mask), = encode_conversations(tokenizer, [turns], template)
        pieces.append((ids, mask))
        digests.add(text_digest(template.render(turns)))
        have += len(ids)
    it.close()
    if not pieces:
        raise DataError(f"{spec}: the stream is empty (no examples in its train split)" if not n else
                        f"{spec}: none of its first {n:,} conversations has an assistant turn: nothing "
                        "carries the loss")
    return Conversations.join(pieces, skipped), digests


class ConversationLane(Lane):
    """A lane of a conversation stream: its conversations rendered, masked and cut into rows
    (plan_rows: one conversation, or a piece of a long one, per row), buffered until B are read."""

    def __init__(self, loader, index):
        self.rows, self.counts = [], {"conversations": 0, "skipped": 0, "tokens": 0, "loss_tokens": 0}
        self.read = 0  # examples of this lane read since it (last) started: where a bad one is
        super().__init__(loader, index)

    def fill(self, need):
        """Read conversations until `need` rows are buffered."""
        loader, fresh_epoch_rows = self.loader, None
        while len(self.rows) < need:
            example = next_example(self.iterator, loader.spec)
            self.dataset_state = self.dataset.state_dict()  # resume after this example
            if example is None:  # end of this lane's conversations: start it over
                if fresh_epoch_rows == 0:
                    raise DataError(loader.too_few(self.counts["conversations"] == 0 < self.counts["skipped"]))
                self.epoch, self.read = self.epoch + 1, 0
                self._restart()
                fresh_epoch_rows = 0
                continue
            lane = f" of lane {self.index} (of {loader.lanes})" if loader.lanes > 1 else ""
            turns = example_turns(example, loader.column, f"{loader.spec} example {self.read}{lane}")
            self.read += 1
            if not any(role == "assistant" for role, _ in turns):
                self.counts["skipped"] += 1  # nothing to learn from: counted, said in the log
                continue
            if loader.held_out and text_digest(loader.template.render(turns)) in loader.held_out:
                continue  # a validation conversation
            (ids, mask), = encode_conversations(loader.tokenizer, [turns], loader.template)
            self.counts["conversations"] += 1
            self.counts["tokens"] += len(ids)
            self.counts["loss_tokens"] += int(mask.sum())
            rows = plan_rows(Conversations(ids, mask, [0, len(ids)]), loader.T)[0]
            self.rows += [(ids[a:b], mask[a:b]) for a, b in rows]
            if fresh_epoch_rows is not None:
                fresh_epoch_rows += len(rows)

    def state_dict(self):
        lengths = np.array([len(ids) for ids, _ in self.rows], np.int64)
        ids = np.concatenate([r[0] for r in self.rows]) if self.rows else np.zeros(0, np.uint16)
        mask = np.concatenate([r[1] for r in self.rows]) if self.rows else np.zeros(0, np.uint8)
        # tensors, not bytes: an empty bytes object is no weights_only-loadable pickle
        return {"dataset": self.dataset_state, "row_tokens": torch.from_numpy(ids.astype(np.int32)),
                "row_mask": torch.from_numpy(mask.astype(np.uint8)), "row_lengths": torch.from_numpy(lengths),
                "epoch": self.epoch, "read": self.read, "counts": dict(self.counts)}

    def load_state_dict(self, state):
        self.iterator.close()
        ids = state["row_tokens"].numpy().astype(np.uint16)
        mask = state["row_mask"].numpy().astype(np.uint8)
        cuts = np.cumsum(state["row_lengths"].numpy())[:-1]
        self.rows = [(a, b) for a, b in zip(np.split(ids, cuts), np.split(mask, cuts))] if len(ids) else []
        self.epoch, self.read, self.counts = int(state["epoch"]), int(state["read"]), dict(state["counts"])
        self._restart(state["dataset"])


class ConversationStreamLoader(StreamLoader):
    """StreamLoader's lanes over an hf: stream of conversations (its examples have a `messages`
    column): each conversation rendered with the chat template and masked as conversation files are
    (chat.py), cut into pieces by plan_rows, and packed into the lines of the (B, T) batch in the
    stream's order (ConversationLoader's packing, without its shuffle: a stream is read once
    through). Validation: the first conversations until --val-tokens tokens, held out of training.
    Each lane's state (the stream's position and the rows read but not yet served) resumes exactly."""

    conversations = True

    lane = ConversationLane  # StreamLoader's __init__ builds these lanes ...
    head = staticmethod(stream_conversations)  # ... and holds out validation with this

    @property
    def template(self):
        """The chat template of the loader's tokenizer (chat.chat_template reads it once)."""
        return chat_template(self.tokenizer_dir)

    def first_fill(self):
        return self.B  # rows: a batch's worth before the first step (bad rows fail now)

    ITEMS, LANE_GETS = "conversations", "conversation with an assistant turn"

    def too_few(self, none_answered=False):
        if none_answered:
            lane = f" of one of its {self.lanes} lanes (world size x grad accum)" if self.lanes > 1 else ""
            return (f"{self.spec}: no conversation{lane} has an assistant turn (all skipped): nothing "
                    "carries the loss")
        return super().too_few()

    def describe(self):
        counts = {k: sum(lane.counts[k] for lane in self.own.values()) for k in self.own[self.mine[0]].counts}
        skipped = f", {counts['skipped']:,} without an assistant turn skipped" if counts["skipped"] else ""
        return (f"conversations streamed, no cache (a 'messages' column: chat template, loss on assistant "
                f"tokens only) | {counts['loss_tokens'] / max(counts['tokens'], 1):.1%} of the tokens of the "
                f"first {counts['conversations']:,} conversations read carry loss{skipped} | packed into rows "
                f"of {self.T}, each attending only to itself, longer ones split at turn boundaries | "
                f"{self.lanes} lane(s) of disjoint conversations (world size x grad accum), each starts over "
                "at its end")

    def next_batch(self):
        """The lane's next rows packed into B lines (ConversationLoader's packing, in stream order);
        the row that did not fit waits in the lane's buffer (its state) for the next batch."""
        lane = self.own[self.mine[self.calls % len(self.mine)]]
        lines, line, used = [], [], 0
        while len(lines) < self.B:
            lane.fill(1)
            n = len(lane.rows[0][0])
            if line and used + n > self.T + 1:
                lines.append(line)
                line, used = [], 0
                continue
            line.append(lane.rows.pop(0))
            used += n
        self.calls += 1
        self.shared = False
        return packed_batch(lines, self.T)

    def state_dict(self):
        return {**super().state_dict(), "conversations": True}
