"""Conversations: rows whose `messages` column is a list of {"role", "content"} turns (the layout of
HuggingFaceTB/smol-smoltalk and TRL), rendered with the chat template of the tokenizer in use (its
directory's chat_template.jinja, else its tokenizer_config.json's chat_template; tokenizer/ holds
SmolLM2's) into token ids, with the mask of the tokens that carry the loss when training on them:
each assistant message's content and the text its turn closes with (SmolLM2: <|im_end|>, without the
newline after it); never the role headers, the system or user turns.

The template is rendered with jinja2 as transformers renders it (an ImmutableSandboxedEnvironment with
trim_blocks and lstrip_blocks, raise_exception, add_generation_prompt), so the ids equal
apply_chat_template's (tests/test_chat.py), and a tokenizer shipped with another template needs no code
change. The text is encoded whole (special tokens split it, as in transformers) and a token carries the
loss when its character span overlaps an assistant span, as transformers' return_assistant_tokens_mask
decides it. Conversations holds the ids and masks of many; token_cache.py caches them, chat_loaders.py
batches them, loss_eval.py scores them; the Space renders the conversation so far with prompt_ids().
"""
import functools
import json
import os
import re

import numpy as np
from jinja2 import TemplateError
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from smollm2.errors import DataError
from smollm2.tokenizer import TOKENIZER_DIR

IM_START, IM_END = "<|im_start|>", "<|im_end|>"  # SmolLM2's turn markers (its EOS when it chats)
ROLES = ("system", "user", "assistant")
COLUMN = "messages"  # the column (JSON field) that marks a row as a conversation
PLACEHOLDER = "\ue000{}\ue001"  # private-use characters: a content's stand-in while its place is found
PLACEHOLDERS = re.compile("\ue000(\\d+)\ue001")


def is_conversation_row(row, text_column="text"):
    """Whether a row (a JSONL object) holds a conversation: it has a `messages` field and no text
    column (a row with both is read as text, its --text-column)."""
    return isinstance(row, dict) and COLUMN in row and text_column not in row


def is_conversation_example(example, column="text"):
    """is_conversation_row for a hub example, whose missing fields are None (datasets gives every
    example all the columns of the stream)."""
    return isinstance(example, dict) and is_conversation_row(
        {k: v for k, v in example.items() if v is not None}, column)


def check_messages(messages, where):
    """messages as a list of (role, content), or a one-line DataError saying where and what is wrong."""
    if not isinstance(messages, (list, tuple)) or not messages:
        kind = "an empty list" if isinstance(messages, (list, tuple)) else type(messages).__name__
        raise DataError(f"{where}: {COLUMN!r} must be a non-empty list of {{\"role\", \"content\"}} "
                        f"turns, got {kind}")
    turns = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            got = f"keys {', '.join(map(str, m)) or 'none'}" if isinstance(m, dict) else type(m).__name__
            raise DataError(f"{where}: message {i} must be a {{\"role\", \"content\"}} object, got {got}")
        role, content = m["role"], m["content"]
        if role not in ROLES:
            raise DataError(f"{where}: message {i} has the unknown role {role!r} (expected one of "
                            f"{', '.join(ROLES)})")
        if not isinstance(content, str):
            raise DataError(f"{where}: message {i} ({role}) has content of type {type(content).__name__}, "
                            "expected a string")
        turns.append((role, content))
    return turns


# ----------------------------------------------------------------------------- the chat template
def read_template(tokenizer_dir=TOKENIZER_DIR):
    """(the chat template's source, its file) where transformers finds it: the directory's
    chat_template.jinja, else the chat_template of its tokenizer_config.json (the "default" one of a
    list); a DataError if there is neither."""
    folder = tokenizer_dir if os.path.isdir(tokenizer_dir) else os.path.dirname(tokenizer_dir)
    path = os.path.join(folder, "chat_template.jinja")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return f.read(), path
    path, template = os.path.join(folder, "tokenizer_config.json"), None
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            template = json.load(f).get("chat_template")
        if isinstance(template, list):
            template = {t.get("name"): t.get("template") for t in template}.get("default")
    if not isinstance(template, str):
        raise DataError(f"no chat template in {folder} (expected a chat_template.jinja, or a chat_template "
                        "in its tokenizer_config.json)")
    return template, path


def compile_template(source):
    """The jinja2 template as transformers compiles a chat template (utils/chat_template_utils.py)."""
    def raise_exception(message):
        raise TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson  # transformers': no HTML escaping
    env.globals["raise_exception"] = raise_exception
    return env.from_string(source)


class ChatTemplate:
    """A tokenizer directory's chat template: conversations [(role, content)] in, text out, and the
    character spans of the assistant contents with the text that closes their turns."""

    def __init__(self, source, where):
        self.source, self.where = source, where
        try:
            self.template = compile_template(source)
        except TemplateError as e:
            raise DataError(f"the chat template {where} does not compile: {e}") from None
        # what closes an assistant turn: the text after its content, up to trailing whitespace
        probe = self.render([("user", PLACEHOLDER.format(0)), ("assistant", PLACEHOLDER.format(1))])
        self.close = probe.partition(PLACEHOLDER.format(1))[2].rstrip()

    def render(self, turns, add_generation_prompt=False):
        """The template applied to turns; a DataError for what it refuses (its raise_exception)."""
        try:
            return self.template.render(messages=[{"role": r, "content": c} for r, c in turns],
                                        add_generation_prompt=add_generation_prompt)
        except TemplateError as e:
            raise DataError(f"the chat template {self.where} refuses the conversation: {e}") from None

    def with_spans(self, turns):
        """(text, [(start, end)]): the rendered turns and the character spans of each assistant content
        with the text that closes its turn, found by rendering placeholders for the contents."""
        text = self.render(turns)
        skeleton = PLACEHOLDERS.split(self.render([(r, PLACEHOLDER.format(i)) for i, (r, _) in enumerate(turns)]))
        skeleton[1::2] = [turns[int(i)] for i in skeleton[1::2]]  # odd pieces: the (role, content) there
        if "".join(p if isinstance(p, str) else p[1] for p in skeleton) != text:
            raise DataError(f"the chat template {self.where} changes the messages' contents (trims them?): "
                            "the loss mask needs each content as it is")
        spans, at = [], 0
        for piece in skeleton:
            role, content = piece if isinstance(piece, tuple) else (None, piece)
            if role == "assistant":
                if not text.startswith(self.close, at + len(content)):
                    raise DataError(f"the chat template {self.where} does not close every assistant turn "
                                    f"with {self.close!r}: the loss mask cannot be found")
                spans.append((at, at + len(content) + len(self.close)))
            at += len(content)
        return text, spans

    def around(self, turns, role):
        """(before, after): the text of turns, a `role` turn and the generation prompt, cut around
        that turn's content, which goes between them."""
        text = self.render([*turns, (role, PLACEHOLDER.format(0))], add_generation_prompt=True)
        before, _, after = text.partition(PLACEHOLDER.format(0))
        return before, after


@functools.lru_cache(maxsize=None)
def chat_template(tokenizer_dir=TOKENIZER_DIR):
    """The ChatTemplate of a tokenizer directory (read once)."""
    return ChatTemplate(*read_template(tokenizer_dir))


# ----------------------------------------------------------------------------- ids and the loss mask
def loss_mask(offsets, spans, n_chars):
    """uint8 per token: 1 where its character span [s, e) overlaps one of spans."""
    inside = np.zeros(n_chars + 1, dtype=np.int64)
    for a, b in spans:
        inside[a] += 1
        inside[b] -= 1
    covered = np.concatenate([[0], np.cumsum(np.cumsum(inside)[:-1] > 0)])  # covered[i]: chars < i in a span
    offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    return (covered[offsets[:, 1]] - covered[offsets[:, 0]] > 0).astype(np.uint8)


def encode_conversations(tokenizer, conversations, template=None):
    """[(ids uint16, mask uint8)] of each conversation (a list of (role, content) turns), batched
    through the tokenizers library; template: the ChatTemplate (default tokenizer/'s)."""
    template = template or chat_template()
    rendered = [template.with_spans(turns) for turns in conversations]
    encodings = tokenizer.encode_batch([text for text, _ in rendered], add_special_tokens=False)
    return [(np.array(enc.ids, dtype=np.uint16), loss_mask(enc.offsets, spans, len(text)))
            for (text, spans), enc in zip(rendered, encodings)]


def prompt_ids(tokenizer, turns, template=None):
    """The ids of the conversation so far, ending where the assistant's next answer begins (what
    apply_chat_template(messages, add_generation_prompt=True) gives)."""
    text = (template or chat_template()).render(turns, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False).ids


def fit_history(tokenizer, turns, room, template=None):
    """(ids, dropped): the prompt of the conversation, its oldest turns dropped (a leading system turn
    kept) until it holds at most `room` tokens; the last user turn is cut from the left if alone it
    is too long. dropped counts the turns left out."""
    template = template or chat_template()
    system = turns[:1] if turns and turns[0][0] == "system" else []
    rest = turns[len(system):]
    for drop in range(len(rest)):
        ids = prompt_ids(tokenizer, system + rest[drop:], template)
        if len(ids) <= room:
            return ids, drop
    role, content = rest[-1]
    before, after = template.around(system, role)
    prefix = tokenizer.encode(before, add_special_tokens=False).ids
    suffix = tokenizer.encode(after, add_special_tokens=False).ids
    keep = max(room - len(prefix) - len(suffix), 1)
    ids = prefix + tokenizer.encode(content, add_special_tokens=False).ids[-keep:] + suffix
    return ids[-room:], len(rest) - 1


# ----------------------------------------------------------------------------- many conversations
class Conversations:
    """Conversations as one run of token ids with the loss mask beside them: conversation i is
    tokens[starts[i]:starts[i + 1]]; mask is 1 on the tokens that carry the loss.
    skipped: rows with no assistant turn, left out. len() is the token count."""

    def __init__(self, tokens, mask, starts, skipped=0):
        self.tokens, self.mask, self.starts, self.skipped = tokens, mask, np.asarray(starts, np.int64), skipped

    @classmethod
    def join(cls, encoded, skipped=0):
        """The Conversations of encode_conversations' [(ids, mask)], one after another."""
        starts = np.concatenate([[0], np.cumsum([len(ids) for ids, _ in encoded], dtype=np.int64)])
        return cls(np.concatenate([ids for ids, _ in encoded]), np.concatenate([mask for _, mask in encoded]),
                   starts, skipped)

    def __len__(self):
        return len(self.tokens)

    @property
    def count(self):
        return len(self.starts) - 1

    def loss_share(self):
        return float(np.count_nonzero(self.mask)) / max(len(self.mask), 1)

    def split(self, val_frac):
        """(train, val): the last val_frac of the conversations (at least one when val_frac > 0) hold
        out; val is None when val_frac is 0."""
        if not 0 <= val_frac < 1:
            raise DataError(f"val_frac must be in [0, 1), got {val_frac}")
        n_val = max(1, int(self.count * val_frac)) if val_frac else 0
        if n_val and n_val >= self.count:
            raise DataError(f"{self.count} conversation(s): too few to hold out --val-frac {val_frac} "
                            "for validation and train on the rest; give more, or --val-frac 0")
        cut = self.count - n_val
        a = int(self.starts[cut])
        train = Conversations(self.tokens[:a], self.mask[:a], self.starts[:cut + 1], self.skipped)
        val = Conversations(self.tokens[a:], self.mask[a:], self.starts[cut:] - a) if n_val else None
        return train, val

    def describe(self):
        skipped = f", {self.skipped:,} without an assistant turn skipped" if self.skipped else ""
        return (f"conversations {self.count:,} (a 'messages' column: chat template, loss on assistant "
                f"tokens only){skipped}, tokens {len(self.tokens):,}, "
                f"{100 * self.loss_share():.1f}% of them carry loss")
