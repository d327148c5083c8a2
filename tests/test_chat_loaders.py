"""smollm2/chat_loaders.py and data.py's conversations: rows split at turn boundaries, packed
batches whose pieces attend only to themselves with every loss token once, exact resume, ranks as
grad accumulation, hf: streams of conversations, train.py on them, and bad conversation data."""
import os

import numpy as np
import pytest
import torch

from conftest import TINY, TRAIN_PY, load_ckpt, losses, read_metrics, run_cmd, run_train
from smollm2.errors import DataError
from smollm2.loaders import DataLoaderLite, StreamLoader
from smollm2.tokenizer import EOT_ID
from test_documents import docs, files, needs_rows, oracle, tokenizer, write_shards  # noqa: F401 (fixtures)
from test_loaders import stream


# ----------------------------------------------------------------------------- conversations
CHAT_DATA = os.path.join(os.path.dirname(TRAIN_PY), "data", "chat", "train.jsonl")
CHAT = ["--dtype", "fp32", "--model", "tiny", "--batch-size", "2", "--seq-len", "48", "--lr", "3e-3", "--warmup", "2",
        "--eval-iters", "2", "--eval-interval", "3", "--log-interval", "1", "--sample-interval", "0",
        "--ckpt-interval", "3"]


def chat_file(folder, rows, name="chat.jsonl"):
    import json
    path = folder / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def conversations():
    from smollm2.token_cache import tokenize_conversations
    return tokenize_conversations(CHAT_DATA, progress=False)


def test_rows_hold_one_conversation_or_a_piece_of_it_and_every_loss_token_once(conversations):
    from smollm2.chat_loaders import plan_rows
    seq_len = 48
    rows, notes = plan_rows(conversations, seq_len)
    assert (rows[:, 1] - rows[:, 0] <= seq_len + 1).all() and notes["split"] > 0 and notes["cut_in_turn"] == 0
    starts = conversations.starts
    owner = np.searchsorted(starts, rows[:, 0], "right") - 1  # each row inside one conversation
    assert (rows[:, 1] <= starts[owner + 1]).all()
    targets = np.zeros(len(conversations), dtype=np.int64)  # how often each token is a trained target
    for a, b in rows:
        targets[a + 1:b] += np.asarray(conversations.mask[a + 1:b])
    mask = np.asarray(conversations.mask).astype(bool)
    firsts = np.zeros(len(mask), bool)
    firsts[starts[:-1]] = True
    assert (targets[mask & ~firsts] == 1).all() and targets.sum() == (mask & ~firsts).sum()
    # split pieces start at a turn's <|im_start|>
    split_starts = [a for a, _ in rows if a not in set(starts.tolist())]
    assert split_starts and all(conversations.tokens[a] == 1 for a in split_starts)


def test_a_turn_longer_than_the_window_is_cut_inside_it_without_losing_a_target(tmp_path):
    from smollm2.chat_loaders import plan_rows
    from smollm2.token_cache import tokenize_conversations
    path = chat_file(tmp_path, [{"messages": [{"role": "user", "content": "Tell me."},
                                              {"role": "assistant", "content": "word " * 120}]}])
    conv = tokenize_conversations(str(path), progress=False)
    rows, notes = plan_rows(conv, 32)
    assert notes["cut_in_turn"] >= 3 and (rows[:, 1] - rows[:, 0] <= 33).all()
    trained = sum(int(np.asarray(conv.mask[a + 1:b]).sum()) for a, b in rows)
    assert trained == int(np.asarray(conv.mask).sum())


def test_conversation_batches_pack_pieces_each_attending_to_itself_with_masked_targets(conversations):
    import dataclasses
    from conftest import TINY_CONFIG
    from model import SmolLM2
    from smollm2.chunked_loss import ChunkedLoss
    from smollm2.chat_loaders import ConversationLoader, conversation_batch
    loader = ConversationLoader(conversations, 4, 256)
    epoch = [i for line in loader.lines for i in line]
    assert sorted(epoch) == list(range(len(loader.rows)))  # every piece once an epoch
    assert len(loader.lines) < len(loader.rows) / 2  # packing: far fewer rows than pieces
    x, y, doc = loader.next_batch()
    assert x.shape == y.shape == doc.shape == (4, 256)
    for r in range(4):
        at = 0
        pieces = loader.rows[loader.lines[r]]
        assert (pieces[:, 1] - pieces[:, 0]).sum() <= 257
        for d, (a, b) in enumerate(pieces):
            n = b - a
            ids = np.asarray(conversations.tokens[a:b]).astype(np.int64)
            keep = np.asarray(conversations.mask[a + 1:b]).astype(bool)
            assert x[r, at:at + n].tolist() == ids[:len(x[r, at:at + n])].tolist()
            assert (doc[r, at:at + n] == d).all()
            expected = np.where(keep, ids[1:], -1).tolist() + [-1]  # a piece's last token predicts nothing
            assert y[r, at:at + n].tolist() == expected[:len(y[r, at:at + n])]
            at += n
        assert (x[r, at:] == EOT_ID).all() and (y[r, at:] == -1).all() and (doc[r, at:] == len(pieces)).all()
    # the packed batch's loss is that of its pieces each alone in its own padded row
    torch.manual_seed(0)
    model = SmolLM2(dataclasses.replace(TINY_CONFIG, vocab_size=49152, max_position_embeddings=256))
    pieces = [p for r in range(4) for p in loader.rows[loader.lines[r]]]
    alone = conversation_batch(conversations, pieces, 256)
    n_packed, n_alone = int((y != -1).sum()), int((alone[1] != -1).sum())
    loss = ChunkedLoss(model)
    packed_sum = loss(x, y, doc) * n_packed
    alone_sum = loss(*alone) * n_alone
    assert n_packed == n_alone and torch.allclose(packed_sum, alone_sum, rtol=1e-5), (n_packed, n_alone)


def test_conversation_loader_resumes_exactly_and_ranks_read_what_one_process_reads(conversations):
    from smollm2.chat_loaders import ConversationLoader
    one = ConversationLoader(conversations, 2, 64)
    seen = [one.next_batch() for _ in range(one.batches_per_epoch + 3)]  # past an epoch: a new order
    assert one.epoch == 1
    again = ConversationLoader(conversations, 2, 64)
    for _ in range(5):
        again.next_batch()
    state = again.state_dict()
    resumed = ConversationLoader(conversations, 2, 64)
    resumed.load_state_dict(state)
    for i in range(5, len(seen)):
        assert all(torch.equal(a, b) for a, b in zip(resumed.next_batch(), seen[i]))
    ranks = [ConversationLoader(conversations, 2, 64, rank=r, world_size=2) for r in range(2)]
    single = ConversationLoader(conversations, 2, 64)
    for _ in range(3):
        expected = [single.next_batch() for _ in range(2)]
        for r, loader in enumerate(ranks):
            assert all(torch.equal(a, b) for a, b in zip(loader.next_batch(), expected[r]))
    with pytest.raises(DataError, match="trained on text, not conversations"):
        resumed.load_state_dict({"position": 0, "epoch": 0})
    with pytest.raises(DataError, match="trained on conversations"):
        DataLoaderLite(np.arange(1000, dtype=np.uint16), 2, 8).load_state_dict(state)


@pytest.fixture(scope="module")
def chat_runs(tmp_path_factory):
    """train.py on data/chat/train.jsonl: 6 steps straight, and 3 more from the step-3 checkpoint."""
    folder = tmp_path_factory.mktemp("chat_runs")
    full = run_train(folder, *CHAT, "--data", CHAT_DATA, "--steps", 6, "--save", "a/checkpoint.pt",
                     "--metrics", "a.jsonl")
    resumed = run_train(folder, "--steps", 6, "--ckpt", "a/checkpoint_step_3.pt", "--save", "b/checkpoint.pt",
                        "--metrics", "b.jsonl")
    return folder, full, resumed


def test_train_py_on_conversations_logs_the_layout_and_resumes_bit_for_bit(chat_runs):
    folder, full, resumed = chat_runs
    line = next(l for l in full.stdout.splitlines() if l.startswith("data: "))
    assert "a 'messages' column" in line and "loss on assistant tokens only" in line, line
    assert "% of them carry loss" in line and "split into" in line and "at turn boundaries" in line, line
    a, b = losses(folder / "a.jsonl"), losses(folder / "b.jsonl")
    assert {s: a[s] for s in (4, 5, 6)} == {s: b[s] for s in (4, 5, 6)}
    ckpt = load_ckpt(folder / "a" / "checkpoint.pt")
    assert ckpt["data"]["conversations"] is True  # the checkpoint says the run trained on conversations
    assert "val loss" in full.stdout


@pytest.mark.parametrize("rows, words", [
    ([{"messages": "hi"}], ["line 1", "'messages' must be a non-empty list"]),
    ([{"messages": [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]}],
     ["line 1", "unknown role 'robot'"]),
    ([{"messages": [{"role": "user", "content": "a"}]}] * 3, ["no conversation", "assistant turn", "3 skipped"]),
    ([{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}, {"text": "x"}],
     ["line 2", "no 'messages' field"]),
])
def test_bad_conversation_data_is_one_line_and_exit_2(tmp_path, rows, words):
    from conftest import assert_one_line_error, train_cmd
    path = chat_file(tmp_path, rows)
    proc = run_cmd(tmp_path, *train_cmd(*TINY, "--data", path, "--steps", 2, "--save", tmp_path / "c.pt"), status=2)
    assert_one_line_error(proc, "train.py", *words)
    assert not (tmp_path / "c.pt").exists()


def test_mixed_text_and_conversation_files_are_one_line_and_exit_2(tmp_path):
    from conftest import assert_one_line_error, train_cmd
    folder = tmp_path / "mixed"
    folder.mkdir()
    chat_file(folder, [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}])
    (folder / "notes.txt").write_text("plain text " * 100)
    proc = run_cmd(tmp_path, *train_cmd(*TINY, "--data", folder, "--steps", 2), status=2)
    assert_one_line_error(proc, "train.py", "mixes conversation files", "chat.jsonl", "notes.txt")


# ----------------------------------------------------------------------------- hf: streams of conversations
CHAT_ROWS = 48  # the first conversations of data/chat/train.jsonl, in 4 parquet shards of 12


@pytest.fixture(scope="module")
def chat_stream(tmp_path_factory):
    """(hf: spec of 4 parquet shards with a `messages` column, as smol-smoltalk's, the same
    conversations as one JSONL file)."""
    import json
    import pyarrow as pa
    import pyarrow.parquet as pq
    folder = tmp_path_factory.mktemp("chat_stream")
    with open(CHAT_DATA) as f:
        rows = [json.loads(line) for line, _ in zip(f, range(CHAT_ROWS))]
    (folder / "shards").mkdir()
    for i in range(4):
        table = pa.table({"messages": [r["messages"] for r in rows[i * 12:(i + 1) * 12]]})
        pq.write_table(table, folder / "shards" / f"part{i}.parquet")
    return "hf:" + str(folder / "shards"), str(chat_file(folder, rows, "all.jsonl"))


def stream_shards(folder, rows, n=2):
    """An hf: folder of n JSONL shards holding rows in order."""
    import json
    folder.mkdir()
    per = -(-len(rows) // n)
    for i in range(n):
        (folder / f"part{i}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[i * per:(i + 1) * per]))
    return f"hf:{folder}"


def packed_in_order(conv, rows, seq_len, batch_size):
    """The batches of rows packed in their order (a stream's packing), batch_size lines each."""
    from smollm2.chat_loaders import pack, packed_batch
    lines = [rows[line] for line in pack(rows[:, 1] - rows[:, 0], seq_len + 1)]
    return [packed_batch([[(conv.tokens[a:b], conv.mask[a:b]) for a, b in line] for line in lines[i:i + batch_size]],
                         seq_len) for i in range(0, len(lines) - batch_size, batch_size)]


@needs_rows
def test_a_conversation_stream_gives_the_rows_and_loss_mask_that_the_same_conversations_give_as_a_file(chat_stream):
    from smollm2.chat_loaders import ConversationStreamLoader, plan_rows
    from smollm2.documents import data_kind
    from smollm2.token_cache import tokenize_conversations
    spec, jsonl = chat_stream
    assert data_kind(spec) == data_kind(jsonl) == "conversations"
    conv = tokenize_conversations(jsonl, progress=False)
    rows, notes = plan_rows(conv, 48)
    assert notes["split"] > 0  # some conversations are longer than a row: split at turn boundaries
    loader = ConversationStreamLoader(spec, 4, 48)
    for i, expected in enumerate(packed_in_order(conv, rows, 48, 4)):  # the file's rows packed in order
        assert all(torch.equal(a, b) for a, b in zip(loader.next_batch(), expected)), i
    assert loader.own[0].epoch == 0
    line = loader.describe()
    assert "a 'messages' column: chat template, loss on assistant tokens only" in line
    share = np.asarray(conv.mask[:conv.starts[loader.own[0].counts["conversations"]]]).mean()
    assert f"{share:.1%} of the tokens of the first {loader.own[0].counts['conversations']} conversations" in line


@needs_rows
def test_a_conversation_stream_holds_out_validation_resumes_exactly_and_ranks_read_what_grad_accum_reads(
        tmp_path, chat_stream, files):
    from smollm2.chat_loaders import ConversationLoader, ConversationStreamLoader, plan_rows
    from smollm2.token_cache import tokenize_conversations
    spec, jsonl = chat_stream
    conv = tokenize_conversations(jsonl, progress=False)
    loader = ConversationStreamLoader(spec, 3, 48, val_tokens=300)
    k = loader.val.count  # the first whole conversations up to 300 tokens: validation
    assert 0 < k < CHAT_ROWS and len(loader.val) >= 300 and loader.val.starts[-2] < 300
    assert np.array_equal(loader.val.tokens, conv.tokens[:conv.starts[k]])
    assert np.array_equal(loader.val.mask, conv.mask[:conv.starts[k]])
    rows = plan_rows(conv, 48)[0]
    trained = rows[rows[:, 0] >= conv.starts[k]]  # training starts after them, and never reads them
    assert all(torch.equal(a, b) for a, b in zip(loader.next_batch(), packed_in_order(conv, trained, 48, 3)[0]))
    for _ in range(40):  # past the end of the stream: the lane has started over
        loader.next_batch()
    assert loader.own[0].epoch >= 1
    torch.save(loader.state_dict(), tmp_path / "state.pt")
    resumed = ConversationStreamLoader(spec, 3, 48, val_tokens=300)
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    for _ in range(40):
        assert all(torch.equal(a, b) for a, b in zip(loader.next_batch(), resumed.next_batch()))
    single = ConversationStreamLoader(spec, 2, 48, grad_accum=2)
    ranks = [ConversationStreamLoader(spec, 2, 48, rank=r, world_size=2) for r in range(2)]
    for _ in range(30):
        for r in range(2):
            assert all(torch.equal(a, b) for a, b in zip(single.next_batch(), ranks[r].next_batch()))
    state = loader.state_dict()
    with pytest.raises(DataError, match="streamed the conversations of"):
        ConversationLoader(conv, 2, 48).load_state_dict(state)
    with pytest.raises(DataError, match="trained on conversations .*, not text"):
        StreamLoader(stream(files), 2, 8).load_state_dict(state)
    with pytest.raises(DataError, match="trained on text, not conversations"):
        resumed.load_state_dict(StreamLoader(stream(files), 2, 8).state_dict())


@pytest.fixture(scope="module")
def chat_stream_runs(tmp_path_factory, chat_stream):
    """train.py on the conversation stream: 6 steps straight, and 3 more from the step-3 checkpoint."""
    folder = tmp_path_factory.mktemp("chat_stream_runs")
    spec, _ = chat_stream
    full = run_train(folder, *CHAT, "--data", spec, "--val-tokens", 200, "--steps", 6, "--save", "a/checkpoint.pt",
                     "--metrics", "a.jsonl")
    resumed = run_train(folder, "--steps", 6, "--ckpt", "a/checkpoint_step_3.pt", "--save", "b/checkpoint.pt",
                        "--metrics", "b.jsonl")
    return folder, full, resumed, spec


@needs_rows
def test_train_py_on_a_conversation_stream_logs_the_layout_validates_and_resumes_bit_for_bit(chat_stream_runs):
    folder, full, resumed, spec = chat_stream_runs
    line = next(l for l in full.stdout.splitlines() if l.startswith("data: "))
    assert line.startswith(f"data: {spec} | conversations streamed, no cache (a 'messages' column"), line
    assert "loss on assistant tokens only" in line and "% of the tokens of the first" in line, line
    assert "validation tokens" in line and "validation tokens 0" not in line, line
    a, b = read_metrics(folder / "a.jsonl"), read_metrics(folder / "b.jsonl")
    assert [r["step"] for r in b] == [4, 5, 6]
    assert [(r["loss"], r["grad_norm"], r.get("val_loss")) for r in b] == \
        [(r["loss"], r["grad_norm"], r.get("val_loss")) for r in a[3:]]  # exactly
    assert [r["step"] for r in a if "val_loss" in r] == [3, 6]
    ckpt = load_ckpt(folder / "a" / "checkpoint.pt")
    assert ckpt["data"]["conversations"] is True and ckpt["data"]["stream"] == spec
    assert full.stderr == resumed.stderr == ""


CHAT_OK = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}


@needs_rows
@pytest.mark.parametrize("rows, words", [
    ([{"messages": "hi"}] * 2, ["example 0", "'messages' must be a non-empty list", "str"]),
    ([CHAT_OK, {"messages": [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]}],
     ["unknown role 'robot'"]),
    ([{"messages": [{"role": "user", "content": "a"}]}] * 3, ["no conversation", "assistant turn"]),
    ([CHAT_OK, {"text": "plain"}], ["no 'messages' field", "its fields: text"]),
])
def test_bad_conversation_streams_are_one_line_errors_before_training(tmp_path, rows, words):
    from smollm2.chat_loaders import ConversationStreamLoader
    spec = stream_shards(tmp_path / "shards", rows, n=1)
    with pytest.raises(DataError) as e:
        ConversationStreamLoader(spec, 2, 48)
    assert "\n" not in str(e.value) and str(e.value).startswith(spec)
    assert all(w in str(e.value) for w in words), str(e.value)


@needs_rows
def test_a_conversation_stream_skips_and_counts_conversations_without_an_answer(tmp_path):
    from smollm2.chat_loaders import ConversationStreamLoader
    spec = stream_shards(tmp_path / "shards", [{"messages": [{"role": "user", "content": "?"}]}, CHAT_OK] * 4, n=1)
    loader = ConversationStreamLoader(spec, 4, 48)
    assert loader.own[0].counts == {**loader.own[0].counts, "conversations": 4, "skipped": 4}
    assert "4 without an assistant turn skipped" in loader.describe()


@needs_rows
def test_validating_on_another_kind_of_data_is_one_line_and_exit_2(tmp_path, chat_stream, corpus):
    from conftest import assert_one_line_error, train_cmd
    spec, jsonl = chat_stream
    proc = run_cmd(tmp_path, *train_cmd(*TINY, "--data", corpus, "--val-data", spec, "--steps", 2,
                                        "--save", tmp_path / "c.pt"), status=2)
    assert_one_line_error(proc, "train.py", f"--data {corpus} holds text but --val-data {spec} holds conversations")
    assert not (tmp_path / "c.pt").exists()
