"""Conversations: rows whose `messages` column is a list of {"role", "content"} turns (the layout of
HuggingFaceTB/smol-smoltalk and TRL), rendered with SmolLM2's chat template (tokenizer/
chat_template.jinja) into token ids, with the mask of the tokens that carry the loss when training on
them: each assistant message's content and the <|im_end|> that closes it; never the role headers, the
system or user turns, nor the newline after <|im_end|>.

The template, written out here so that nothing renders Jinja at run time (tests/test_chat.py checks the
ids against transformers' apply_chat_template with the file itself):

    [<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n
     when the first message is not a system one], then for every message
    <|im_start|>ROLE\\nCONTENT<|im_end|>\\n, then <|im_start|>assistant\\n for a generation prompt.

The text is encoded whole (special tokens split it, as in transformers) and a token carries the loss
when its character span overlaps an assistant span (content + <|im_end|>), as transformers'
return_assistant_tokens_mask decides it. token_cache.py caches the ids and the mask of a corpus,
chat_loaders.py batches them, loss_eval.py scores them; the Space renders the conversation so far with
prompt_ids().
"""
import numpy as np

from smollm2.errors import DataError

SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"  # chat_template.jinja
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
ROLES = ("system", "user", "assistant")
COLUMN = "messages"  # the column (JSON field) that marks a row as a conversation


def is_conversation_row(row, text_column="text"):
    """Whether a row (a JSONL object, a hub example) holds a conversation: it has a `messages` field
    and no text column (a row with both is read as text, its --text-column)."""
    return isinstance(row, dict) and COLUMN in row and text_column not in row


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


def render(turns, add_generation_prompt=False):
    """(text, [(start, end)] character spans of the assistant contents with their <|im_end|>): the
    chat template applied to turns [(role, content)]."""
    parts, spans, at = [], [], 0
    if not turns or turns[0][0] != "system":
        parts.append(f"{IM_START}system\n{SYSTEM_PROMPT}{IM_END}\n")
        at = len(parts[0])
    for role, content in turns:
        head = f"{IM_START}{role}\n"
        piece = f"{head}{content}{IM_END}\n"
        if role == "assistant":
            spans.append((at + len(head), at + len(piece) - 1))  # content and <|im_end|>, not the \n
        parts.append(piece)
        at += len(piece)
    if add_generation_prompt:
        parts.append(f"{IM_START}assistant\n")
    return "".join(parts), spans


def loss_mask(offsets, spans, n_chars):
    """uint8 per token: 1 where its character span [s, e) overlaps one of spans."""
    inside = np.zeros(n_chars + 1, dtype=np.int64)
    for a, b in spans:
        inside[a] += 1
        inside[b] -= 1
    covered = np.concatenate([[0], np.cumsum(np.cumsum(inside)[:-1] > 0)])  # covered[i]: chars < i in a span
    offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    return (covered[offsets[:, 1]] - covered[offsets[:, 0]] > 0).astype(np.uint8)


def encode_conversations(tokenizer, conversations):
    """[(ids uint16, mask uint8)] of each conversation (a list of (role, content) turns), batched
    through the tokenizers library."""
    rendered = [render(turns) for turns in conversations]
    encodings = tokenizer.encode_batch([text for text, _ in rendered], add_special_tokens=False)
    return [(np.array(enc.ids, dtype=np.uint16), loss_mask(enc.offsets, spans, len(text)))
            for (text, spans), enc in zip(rendered, encodings)]


def prompt_ids(tokenizer, turns):
    """The ids of the conversation so far, ending where the assistant's next answer begins (what
    apply_chat_template(messages, add_generation_prompt=True) gives)."""
    return tokenizer.encode(render(turns, add_generation_prompt=True)[0], add_special_tokens=False).ids


def fit_history(tokenizer, turns, room):
    """(ids, dropped): the prompt of the conversation, its oldest turns dropped (a leading system turn
    kept) until it holds at most `room` tokens; the last user turn is cut from the left if alone it
    is too long. dropped counts the turns left out."""
    system = turns[:1] if turns and turns[0][0] == "system" else []
    rest = turns[len(system):]
    for drop in range(len(rest)):
        ids = prompt_ids(tokenizer, system + rest[drop:])
        if len(ids) <= room:
            return ids, drop
    role, content = rest[-1]
    suffix_text = f"{IM_END}\n{IM_START}assistant\n"
    prefix = tokenizer.encode(render(system + [(role, "")], True)[0][:-len(suffix_text)], add_special_tokens=False).ids
    suffix = tokenizer.encode(suffix_text, add_special_tokens=False).ids
    keep = max(room - len(prefix) - len(suffix), 1)
    ids = prefix + tokenizer.encode(content, add_special_tokens=False).ids[-keep:] + suffix
    return ids[-room:], len(rest) - 1
