"""Text from a model. sample_text: a prompt in, the prompt and its continuation out, as train.py prints
its samples (the random draws come from a generator of their own, so a run's random state is
untouched). What sample.py and the Space share: the chat template's wrapping of a prompt, and
TextStream, which turns generated ids into text as they come."""
import torch

from smollm2 import engine
from smollm2.chat import IM_END, chat_template
from smollm2.tokenizer import EOT_ID, load_tokenizer

CHAT_END = IM_END  # ends every turn of the chat template


def sample_text(model, prompt, max_new_tokens, seed, temperature=0.8, top_k=50, tokenizer=None):
    """The prompt followed by max_new_tokens sampled tokens, as text; model is left in training
    mode if it was."""
    tok = tokenizer or load_tokenizer()
    ids = tok.encode(prompt).ids or [EOT_ID]
    device = model.lm_head.weight.device
    gen = torch.Generator(device).manual_seed(seed)  # leaves the global RNG alone
    training = model.training
    model.eval()
    new = engine.generate(model, ids, max_new_tokens, temperature=temperature, top_k=top_k, generator=gen)
    model.train(training)
    return prompt + tok.decode(new)


def is_chat_model(tokenizer, eos_token_id):
    """Whether the model is an Instruct one: it ends its turns, so its text, with <|im_end|>."""
    return tokenizer.token_to_id(CHAT_END) == eos_token_id


def chat_wrap(tokenizer, template=None):
    """(prefix ids, suffix ids) that make a prompt the user's turn of the chat template (default
    tokenizer/'s) after its default system prompt, ending where the assistant's answer begins."""
    before, after = (template or chat_template()).around([], "user")
    return tokenizer.encode(before).ids, tokenizer.encode(after).ids


class TextStream:
    """Token ids in, text pieces out, as they are generated. Only the ids not yet shown are decoded,
    and they are held back while their text ends in U+FFFD (a UTF-8 character cut between tokens),
    so a character split across tokens appears whole and the text is never re-decoded from scratch."""

    HOLD_LIMIT = 8  # a character spans at most 4 bytes: longer pending runs are really invalid bytes

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.pending = []

    def push(self, token_id):
        self.pending.append(token_id)
        text = self.tokenizer.decode(self.pending)
        if text.endswith("\ufffd") and len(self.pending) < self.HOLD_LIMIT:
            return ""
        self.pending = []
        return text

    def flush(self):
        text = self.tokenizer.decode(self.pending) if self.pending else ""
        self.pending = []
        return text
