"""eval.py and smollm2/loss_eval.py: loss, perplexity and bits per byte, checked against transformers
computing the same windows on its own, and bad input as one line with exit status 2."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT, TRAIN_ENV, assert_one_line_error, peaked_tiny_preset, run_cmd

EVAL_PY = os.path.join(ROOT, "eval.py")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A random tiny model with peaked predictions, as an HF directory."""
    model = peaked_tiny_preset()
    folder = tmp_path_factory.mktemp("eval") / "tiny"
    model.save_pretrained(folder, dtype=torch.float32)
    return folder


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    """Shakespeare, accents and emoji (multi-byte UTF-8), about 270 tokens."""
    with open(os.path.join(ROOT, "input.txt")) as f:
        text = f.read(900) + "\nCafé, naïve, 🤗 — «quoted» 1234567\n"
    path = tmp_path_factory.mktemp("eval_data") / "text.txt"
    path.write_text(text, encoding="utf-8")
    return path


def transformers_reference(folder, text, seq_len):
    """Summed nats and count: windows of seq_len + 1 tokens every seq_len tokens, in transformers."""
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = Tokenizer.from_file(os.path.join(ROOT, "tokenizer", "tokenizer.json")).encode(text).ids
    nats, count, predicted = 0.0, 0, []
    for start in range(0, len(ids) - 1, seq_len):
        window = torch.tensor([ids[start:start + seq_len + 1]])
        with torch.no_grad():
            logits = hf(window[:, :-1]).logits[0]
        nats += torch.nn.functional.cross_entropy(logits, window[0, 1:], reduction="sum").item()
        count += window.size(1) - 1
        predicted += range(start + 1, start + window.size(1))
    assert predicted == list(range(1, len(ids)))  # every token from t1 on, exactly once
    return nats, count


@pytest.mark.parametrize("seq_len, batch_size", [(64, 3), (50, 1)])
def test_eval_equals_transformers_on_the_same_windows(tmp_path, tiny_dir, text_file, seq_len, batch_size):
    out = tmp_path / "result.json"
    proc = run_cmd(tmp_path, "python", EVAL_PY, tiny_dir, "--data", text_file, "--seq-len", seq_len,
                   "--batch-size", batch_size, "--json", out, "--device", "cpu")
    result = json.loads(out.read_text())
    assert set(result) == {"loss", "perplexity", "bits_per_byte", "tokens", "bytes", "source"}
    text = text_file.read_text(encoding="utf-8")
    nats, count = transformers_reference(tiny_dir, text, seq_len)
    assert count % seq_len != 0  # the last window is a partial one, and it counts
    assert result["tokens"] == count and result["bytes"] == len(text.encode("utf-8"))
    assert result["loss"] == pytest.approx(nats / count, abs=1e-4)
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]), rel=1e-12)
    assert result["bits_per_byte"] == pytest.approx(nats / math.log(2) / result["bytes"], rel=1e-4)
    assert result["source"] == str(tiny_dir) and f"bits per byte {result['bits_per_byte']:.4f}" in proc.stdout


@pytest.mark.parametrize("args, message", [
    (["missing_model", "--data", "{text}"], "missing_model: no such file"),
    (["{model}", "--data", "nope.txt"], "no such file or directory: nope.txt"),
    (["{model}", "--data", "{text}", "--seq-len", "0"], "--seq-len: must be > 0"),
    (["{model}", "--data", "{text}", "--seq-len", "5000"], "exceeds the model's context window of 1024"),
    (["{model}"], "give --data (loss and bits per byte on a text) or --tasks"),
    (["{model}", "--data", "{text}", "--json", "."], "--json . is a directory"),
])
def test_bad_eval_input_is_one_line_and_exit_2(tmp_path, tiny_dir, text_file, args, message):
    args = [a.format(model=tiny_dir, text=text_file) for a in args]
    proc = run_cmd(tmp_path, "python", EVAL_PY, *args, status=2)
    assert proc.stderr.startswith("eval.py: error: ") and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert message in proc.stderr


def test_a_json_output_in_a_read_only_folder_is_refused_before_evaluating(tmp_path, tiny_dir, text_file,
                                                                         read_only_dir):
    out = read_only_dir / "e.json"
    proc = subprocess.run([sys.executable, EVAL_PY, tiny_dir, "--data", text_file, "--json", out], cwd=tmp_path,
                          env=TRAIN_ENV, capture_output=True, text=True, timeout=300)
    assert_one_line_error(proc, "eval.py", out)
    assert proc.stdout == ""  # no result line: it stopped before the evaluation


def test_eval_help_shows_every_default(tmp_path):
    text = " ".join(run_cmd(tmp_path, sys.executable, EVAL_PY, "--help").stdout.split())
    for default in ("(default text)", "(default 1000000)", "(default 1024)", "(default 1 on a CPU or Mac, 16 on a GPU)",
                    "(default auto:"):
        assert default in text, default


def test_eval_batches_windows_on_a_gpu_and_reads_one_at_a_time_elsewhere():
    from smollm2.loss_eval import eval_batch_size
    assert eval_batch_size("cpu") == eval_batch_size("mps") == 1 and eval_batch_size("cuda") == 16


def test_parquet_jsonl_and_hf_stream_evaluate_like_the_same_text_files(tmp_path, tiny_dir):
    """The same two documents as text files, parquet rows, JSONL lines and an hf: stream of a parquet
    shard: the same tokens, the same UTF-8 bytes (not the parquet file's size), the same loss. The
    parquet file's token cache lands in the shard folder, and the stream must not take it for data."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from smollm2 import loss_eval
    docs = ["First Citizen:\nBefore we proceed any further, hear me speak.", "Café, naïve, 🤗 — «quoted» 42"]
    (tmp_path / "txt").mkdir()
    for i, doc in enumerate(docs):
        (tmp_path / "txt" / f"{i}.txt").write_text(doc, encoding="utf-8")
    (tmp_path / "shards").mkdir()
    pq.write_table(pa.table({"text": docs}), tmp_path / "shards" / "docs.parquet")
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"body": d}) + "\n" for d in docs))
    want = loss_eval.evaluate(tiny_dir, str(tmp_path / "txt"), seq_len=16, batch_size=2)
    assert want["bytes"] == sum(len(d.encode()) for d in docs)
    for spec, column in [(tmp_path / "shards" / "docs.parquet", "text"), (tmp_path / "docs.jsonl", "body"),
                         (f"hf:{tmp_path / 'shards'}", "text")]:
        got = loss_eval.evaluate(tiny_dir, str(spec), seq_len=16, batch_size=2, column=column)
        assert {k: got[k] for k in ("tokens", "bytes")} == {k: want[k] for k in ("tokens", "bytes")}, spec
        assert got["loss"] == pytest.approx(want["loss"], abs=1e-6), spec


# ----------------------------------------------------------------------------- conversations
HELDOUT = os.path.join(ROOT, "data", "chat", "heldout.jsonl")


def first_conversations(n):
    with open(HELDOUT) as f:
        return [json.loads(line)["messages"] for line, _ in zip(f, range(n))]


def assistant_token_reference(model, conversations, seq_len):
    """transformers on its own: each conversation's chat-template ids and assistant mask (the template
    with {% generation %}, as tests/test_chat.py builds it), cut to its last seq_len + 1 tokens, and
    the summed cross-entropy of the HF model's logits over the targets the mask keeps."""
    from transformers import AutoTokenizer
    from test_chat import GENERATION_TURN, TOKENIZER, TURN
    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    template = tok.chat_template.replace(TURN, GENERATION_TURN)
    nats, count, cut = 0.0, 0, 0
    for messages in conversations:
        out = tok.apply_chat_template(messages, chat_template=template, tokenize=True, return_dict=True,
                                      return_assistant_tokens_mask=True)
        ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
        cut += len(ids) > seq_len + 1
        ids, mask = torch.tensor(ids[-(seq_len + 1):]), torch.tensor(mask[-(seq_len + 1):]).bool()
        with torch.no_grad():
            logits = model(ids[None, :-1]).logits[0]
        keep = mask[1:]
        nats += torch.nn.functional.cross_entropy(logits[keep], ids[1:][keep], reduction="sum").item()
        count += int(keep.sum())
    return nats, count, cut


@pytest.mark.slow
def test_eval_on_conversations_is_transformers_loss_over_the_assistant_tokens_of_each_alone(
        tmp_path, gguf_path, hf_real_model):
    """The real SmolLM2-135M-Instruct on six held-out conversations, three of them longer than the
    window (cut from the left): eval.py's loss is transformers' cross-entropy over the assistant tokens
    (contents and their <|im_end|>) of each conversation scored on its own."""
    conversations, seq_len = first_conversations(6), 64
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in conversations))
    out = tmp_path / "result.json"
    proc = run_cmd(tmp_path, sys.executable, EVAL_PY, gguf_path, "--data", data, "--seq-len", seq_len,
                   "--json", out, "--device", "cpu")
    result = json.loads(out.read_text())
    nats, count, cut = assistant_token_reference(hf_real_model, conversations, seq_len)
    assert 0 < cut < len(conversations)  # some cut from the left, some whole
    assert result["assistant_tokens_only"] and result["conversations"] == 6 and result["tokens"] == count
    assert result["loss"] == pytest.approx(nats / count, abs=1e-3)
    assert result["loss"] < 3  # the Instruct model answers these well: not a uniform guess (10.8)
    assert f"{count:,} assistant tokens of 6 conversations" in proc.stdout and f"loss {result['loss']:.4f}" in proc.stdout


def test_conversations_as_jsonl_parquet_and_an_hf_stream_evaluate_alike(tmp_path, tiny_dir):
    """The same conversations as a JSONL file, a parquet file and an hf: stream of JSONL shards: the
    same assistant tokens, bytes and loss (a stream: its first --max-tokens of whole conversations)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from smollm2 import loss_eval
    conversations = first_conversations(8)
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps({"messages": m}) + "\n" for m in conversations))
    pq.write_table(pa.table({"messages": conversations}), tmp_path / "chat.parquet")
    (tmp_path / "shards").mkdir()
    for i in range(2):
        (tmp_path / "shards" / f"part{i}.jsonl").write_text(
            "".join(json.dumps({"messages": m}) + "\n" for m in conversations[4 * i:4 * i + 4]))
    want = loss_eval.evaluate(tiny_dir, str(tmp_path / "chat.jsonl"), seq_len=64)
    assert want["assistant_tokens_only"] and want["conversations"] == 8
    for spec in (tmp_path / "chat.parquet", f"hf:{tmp_path / 'shards'}"):
        got = loss_eval.evaluate(tiny_dir, str(spec), seq_len=64)
        assert {k: got[k] for k in ("tokens", "bytes", "conversations")} == \
            {k: want[k] for k in ("tokens", "bytes", "conversations")}, spec
        assert got["loss"] == pytest.approx(want["loss"], abs=1e-6), spec
    head = loss_eval.evaluate(tiny_dir, f"hf:{tmp_path / 'shards'}", seq_len=64, max_tokens=100)
    assert 0 < head["conversations"] < 8  # whole conversations until 100 tokens


@pytest.mark.parametrize("rows, message", [
    ([{"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]}], "unknown role 'bot'"),
    ([{"messages": [{"role": "user", "content": "a"}]}], "no conversation in"),
])
def test_bad_conversations_to_eval_are_one_line_and_exit_2(tmp_path, tiny_dir, rows, message):
    (tmp_path / "bad.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = run_cmd(tmp_path, sys.executable, EVAL_PY, tiny_dir, "--data", tmp_path / "bad.jsonl", status=2)
    assert_one_line_error(proc, "eval.py", message)
    assert proc.stdout == "" and [p.name for p in tmp_path.iterdir()] == ["bad.jsonl"]  # no cache left behind
