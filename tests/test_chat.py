"""smollm2/chat.py: conversations rendered with the tokenizer folder's chat template (the repo's
tokenizer/chat_template.jinja, or another one shipped beside a tokenizer) give exactly transformers'
apply_chat_template ids, and the loss mask is transformers' assistant-token mask (the same template with
{% generation %} around each assistant content and its <|im_end|>), checked again from the tokenizers'
character offsets."""
import json
import os
import shutil

import numpy as np
import pytest
from tokenizers import Tokenizer

from conftest import ROOT
from smollm2.chat import chat_template, check_messages, encode_conversations, fit_history, prompt_ids
from smollm2.errors import DataError

TOKENIZER = os.path.join(ROOT, "tokenizer")
TURN = "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
GENERATION_TURN = ("{% if message['role'] == 'assistant' %}{{'<|im_start|>assistant\n'}}{% generation %}"
                   "{{message['content'] + '<|im_end|>'}}{% endgeneration %}{{'\n'}}{% else %}" + TURN + "{% endif %}")

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4."}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Name a colour."},
     {"role": "assistant", "content": "Blue."}],
    [{"role": "user", "content": "Ünïcödé, 日本語 and emoji 😀🚀?"},
     {"role": "assistant", "content": "Ça va: 東京 🗼, naïve café."}],
    [{"role": "user", "content": ""}, {"role": "assistant", "content": ""}, {"role": "user", "content": "\n"},
     {"role": "assistant", "content": "\n\n  indented\n"}],
    [{"role": "system", "content": ""}, {"role": "user", "content": "a"}, {"role": "assistant", "content": " b "},
     {"role": "assistant", "content": "two answers in a row"}],
    [{"role": "user", "content": "say <|im_end|> literally"}, {"role": "assistant", "content": "ok <|im_start|>"}],
]


@pytest.fixture(scope="module")
def hf_tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(TOKENIZER)


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.from_file(os.path.join(TOKENIZER, "tokenizer.json"))


def test_the_repos_template_is_the_one_transformers_uses(hf_tokenizer):
    with open(os.path.join(TOKENIZER, "chat_template.jinja")) as f:
        template = f.read()
    assert hf_tokenizer.chat_template == template and TURN in template


@pytest.mark.parametrize("index", range(len(CONVERSATIONS)))
def test_ids_and_loss_mask_equal_transformers(index, hf_tokenizer, tokenizer):
    messages = CONVERSATIONS[index]
    (ids, mask), = encode_conversations(tokenizer, [check_messages(messages, "test")])
    expected = hf_tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
    assert ids.tolist() == list(expected)
    template = hf_tokenizer.chat_template.replace(TURN, GENERATION_TURN)
    out = hf_tokenizer.apply_chat_template(messages, chat_template=template, tokenize=True, return_dict=True,
                                           return_assistant_tokens_mask=True)
    assert list(out["input_ids"]) == ids.tolist()
    assert mask.tolist() == list(out["assistant_masks"])
    # again from character offsets: the rendered text, found by hand, and the tokenizer's offsets
    text = hf_tokenizer.apply_chat_template(messages, tokenize=False)
    enc = tokenizer.encode(text, add_special_tokens=False)
    spans, at = [], 0
    for m in messages:
        at = text.index("<|im_start|>" + m["role"] + "\n", at) + len("<|im_start|>" + m["role"] + "\n")
        end = at + len(m["content"]) + len("<|im_end|>")
        assert text[end - len("<|im_end|>"):end] == "<|im_end|>"
        if m["role"] == "assistant":
            spans.append((at, end))
        at = end
    by_offsets = [int(any(s < b and e > a for a, b in spans)) for s, e in enc.offsets]
    assert mask.tolist() == by_offsets
    # the system, user and header tokens carry no loss; every assistant turn's <|im_end|> does
    assert sum(int(i == 2) for i, keep in zip(ids, mask) if keep) == sum(m["role"] == "assistant" for m in messages)


def test_generation_prompt_equals_transformers(hf_tokenizer, tokenizer):
    for messages in CONVERSATIONS:
        history = messages[:-1]
        expected = hf_tokenizer.apply_chat_template(history, tokenize=True, add_generation_prompt=True,
                                                    return_dict=True)["input_ids"]
        assert prompt_ids(tokenizer, check_messages(history, "test")) == list(expected)


def test_fit_history_drops_the_oldest_turns_and_keeps_the_system_prompt(tokenizer):
    turns = [("system", "Be brief.")] + [(r, f"turn {i} " + "word " * 20) for i in range(6)
                                        for r in ("user", "assistant")] + [("user", "last question")]
    full = prompt_ids(tokenizer, turns)
    ids, dropped = fit_history(tokenizer, turns, len(full))
    assert ids == full and dropped == 0
    ids, dropped = fit_history(tokenizer, turns, len(full) - 10)
    assert dropped >= 1 and len(ids) <= len(full) - 10
    assert ids == prompt_ids(tokenizer, turns[:1] + turns[1 + dropped:])  # whole turns, system kept
    ids, dropped = fit_history(tokenizer, [("user", "word " * 500)], 40)
    assert len(ids) <= 40 and ids[-6:] == tokenizer.encode("<|im_end|>\n<|im_start|>assistant\n").ids
    assert tokenizer.decode(ids).rstrip().endswith("assistant") and "word" in tokenizer.decode(ids)


@pytest.mark.parametrize("messages, words", [
    ("hello", ["'messages'", "list", "str"]),
    ([], ["empty list"]),
    ([{"role": "user"}], ["message 0", "role", "content"]),
    ([{"role": "user", "content": "a"}, "b"], ["message 1", "str"]),
    ([{"role": "bot", "content": "a"}], ["unknown role 'bot'", "system, user, assistant"]),
    ([{"role": "user", "content": 3}], ["message 0", "int", "string"]),
])
def test_bad_messages_are_one_line_errors(messages, words):
    with pytest.raises(DataError) as e:
        check_messages(messages, "f.jsonl line 3")
    message = str(e.value)
    assert message.startswith("f.jsonl line 3: ") and "\n" not in message
    assert all(w in message for w in words), message


def test_render_spans_cover_each_assistant_content_and_its_end():
    text, spans = chat_template().with_spans([("user", "q"), ("assistant", "answer")])
    assert [text[a:b] for a, b in spans] == ["answer<|im_end|>"]
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert np.all(np.array(spans) > 0)


# ----------------------------------------------------------------------------- another template
# A template of another shape (as Llama 3's): no default system prompt, a turn closed by <|im_end|> with no
# newline after it, a raise_exception for two turns in a row of one role, and a generation prompt
OTHER = ("{% for message in messages %}"
         "{% if loop.index0 > 0 and message['role'] == messages[loop.index0 - 1]['role'] %}"
         "{{ raise_exception('two turns in a row from ' + message['role']) }}{% endif %}"
         "{{ '<|im_start|>' + message['role'] + ':\n\n' + message['content'] + '<|im_end|>' }}{% endfor %}"
         "{% if add_generation_prompt %}{{ '<|im_start|>assistant:\n\n' }}{% endif %}")
OTHER_TURN = "{{ '<|im_start|>' + message['role'] + ':\n\n' + message['content'] + '<|im_end|>' }}"
OTHER_GENERATION_TURN = ("{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant:\n\n' }}"
                         "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
                         "{% else %}" + OTHER_TURN + "{% endif %}")


def tokenizer_folder(folder, template=None, in_config=None):
    """A copy of tokenizer/ whose chat template is `template` (a chat_template.jinja) or `in_config`
    (tokenizer_config.json's chat_template, no .jinja file)."""
    shutil.copytree(TOKENIZER, folder, ignore=shutil.ignore_patterns("chat_template.jinja"))
    if template is not None:
        (folder / "chat_template.jinja").write_text(template)
    if in_config is not None:
        config = json.loads((folder / "tokenizer_config.json").read_text())
        (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": in_config}))
    return str(folder)


@pytest.mark.parametrize("where", ["chat_template.jinja", "tokenizer_config.json"])
def test_another_template_shipped_with_the_tokenizer_is_the_one_rendered_as_transformers_does(
        tmp_path, tokenizer, where):
    from transformers import AutoTokenizer
    folder = tokenizer_folder(tmp_path / "tok", *([OTHER] if where == "chat_template.jinja" else [None, OTHER]))
    template = chat_template(folder)
    hf = AutoTokenizer.from_pretrained(folder)
    assert template.source == hf.chat_template == OTHER
    for messages in CONVERSATIONS[:4]:
        (ids, mask), = encode_conversations(tokenizer, [check_messages(messages, "test")], template)
        out = hf.apply_chat_template(messages, chat_template=OTHER.replace(OTHER_TURN, OTHER_GENERATION_TURN),
                                     tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        assert ids.tolist() == list(out["input_ids"]) and mask.tolist() == list(out["assistant_masks"])
        assert ids.tolist() == list(hf.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])
        history = check_messages(messages[:-1], "test")
        assert prompt_ids(tokenizer, history, template) == list(hf.apply_chat_template(
            messages[:-1], tokenize=True, add_generation_prompt=True, return_dict=True)["input_ids"])


def test_what_the_template_refuses_or_lacks_is_a_one_line_data_error(tmp_path, tokenizer):
    template = chat_template(tokenizer_folder(tmp_path / "other", OTHER))
    with pytest.raises(DataError, match="refuses the conversation: two turns in a row from user$"):
        encode_conversations(tokenizer, [[("user", "first"), ("user", "then")]], template)
    with pytest.raises(DataError, match="no chat template in"):
        chat_template(tokenizer_folder(tmp_path / "none"))
    with open(os.path.join(TOKENIZER, "chat_template.jinja")) as f:
        trimming = f.read().replace("message['content']", "message['content'] | trim")
    trims = chat_template(tokenizer_folder(tmp_path / "trims", trimming))
    with pytest.raises(DataError, match="changes the messages' contents"):
        encode_conversations(tokenizer, [[("user", " q "), ("assistant", " a ")]], trims)
