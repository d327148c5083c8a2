"""sources.py: parquet and JSONL documents tokenise like text files, hf: streams train, validate and
resume exactly, ranks read disjoint documents, and bad data is one line on stderr."""
import gzip
import json
import os
import re
import sys

import numpy as np
import pytest
import torch

import data
import sources
from conftest import ROOT, TINY, TRAIN_PY, load_ckpt, losses, read_metrics, run_cmd, run_train
from data import DataError, tokenize_corpus
from sources import StreamLoader

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
pytest.importorskip("datasets")

N_DOCS = 40


@pytest.fixture(scope="module")
def tokenizer():
    return data.load_tokenizer()


@pytest.fixture(scope="module")
def docs():
    """40 distinct paragraphs of tiny Shakespeare (about 1,500 tokens in all)."""
    with open(os.path.join(ROOT, "input.txt"), encoding="utf-8") as f:
        paragraphs = [p for p in f.read(40_000).split("\n\n") if p.strip()]
    assert len(set(paragraphs[:N_DOCS])) == N_DOCS
    return paragraphs[:N_DOCS]


def oracle(tokenizer, docs):
    """What the issue asks for, from the tokenizer alone: each document's ids, EOT between them."""
    ids = []
    for doc in docs:
        ids += ([data.EOT_ID] if ids else []) + tokenizer.encode(doc).ids
    return ids


def write_parquet(path, columns, row_group_size=7):
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return str(path)


def write_jsonl(path, rows):
    lines = "".join(json.dumps(row) + "\n" for row in rows).encode()
    with (gzip.open if str(path).endswith(".gz") else open)(path, "wb") as f:
        f.write(lines)
    return str(path)


def write_text_folder(folder, docs):
    folder.mkdir()
    for i, doc in enumerate(docs):
        (folder / f"doc{i:03d}.txt").write_text(doc, encoding="utf-8")
    return str(folder)


def write_shards(folder, docs, n=4):
    """A folder of n parquet shards holding docs in order (shard i: the i-th run of them)."""
    folder.mkdir()
    per = -(-len(docs) // n)
    for i in range(n):
        write_parquet(folder / f"part{i}.parquet", {"text": docs[i * per:(i + 1) * per]}, 3)
    return str(folder)


@pytest.fixture(scope="module")
def files(tmp_path_factory, docs):
    """The same documents as a text folder, a parquet file, JSONL, gzipped JSONL and parquet shards."""
    tmp = tmp_path_factory.mktemp("sources")
    return {"text": write_text_folder(tmp / "text", docs),
            "parquet": write_parquet(tmp / "docs.parquet", {"id": list(range(N_DOCS)), "text": docs}),
            "jsonl": write_jsonl(tmp / "docs.jsonl", [{"text": d, "n": i} for i, d in enumerate(docs)]),
            "jsonl.gz": write_jsonl(tmp / "docs.jsonl.gz", [{"text": d} for d in docs]),
            "shards": write_shards(tmp / "shards", docs), "tmp": tmp}


# ----------------------------------------------------------------------------- files
def test_parquet_and_jsonl_rows_give_exactly_the_ids_of_a_folder_of_text_files(tmp_path, files, docs,
                                                                                tokenizer):
    expected = np.array(oracle(tokenizer, docs), dtype=np.uint16)
    glob_of_shards = os.path.join(files["shards"], "part*.parquet")
    for kind in ("text", "parquet", "jsonl", "jsonl.gz", "shards"):
        tokens = tokenize_corpus(files[kind], cache_dir=tmp_path / kind, progress=False)
        np.testing.assert_array_equal(tokens, expected, err_msg=kind)
    np.testing.assert_array_equal(tokenize_corpus(glob_of_shards, cache_dir=tmp_path / "g",
                                                  progress=False), expected)
    assert data.dataset_stats(expected)["documents"] == N_DOCS


def test_parquet_is_read_one_row_group_of_the_text_column_at_a_time(tmp_path, files, monkeypatch):
    groups = []
    real = pq.ParquetFile.read_row_group

    def spy(self, i, columns=None, **kw):
        groups.append((i, tuple(columns)))
        return real(self, i, columns=columns, **kw)
    monkeypatch.setattr(pq.ParquetFile, "read_row_group", spy)
    monkeypatch.setattr(pq.ParquetFile, "read", lambda *a, **k: pytest.fail("read a whole file"))
    tokenize_corpus(files["parquet"], cache_dir=tmp_path, progress=False)
    assert groups == [(i, ("text",)) for i in range(-(-N_DOCS // 7))]  # 6 groups of 7 rows


def test_the_cache_key_covers_the_text_column(tmp_path, docs, tokenizer):
    path = write_parquet(tmp_path / "two.parquet", {"text": docs, "title": [d[:20] for d in docs]})
    cache = tmp_path / "cache"
    body = tokenize_corpus(path, cache_dir=cache, progress=False)
    assert len(os.listdir(cache)) == 1
    assert tokenize_corpus(path, cache_dir=cache, progress=False).tolist() == body.tolist()  # a hit
    titles = tokenize_corpus(path, cache_dir=cache, progress=False, text_column="title")
    assert len(os.listdir(cache)) == 2
    assert titles.tolist() == oracle(tokenizer, [d[:20] for d in docs])


def test_a_3_step_run_on_parquet_or_jsonl_has_the_losses_of_the_text_folder(tmp_path, files):
    runs = {}
    for kind in ("text", "parquet", "jsonl"):
        run_train(tmp_path, *TINY, "--data", files[kind], "--steps", 3, "--save", f"{kind}.pt",
                  "--metrics", f"{kind}.jsonl")
        runs[kind] = losses(tmp_path / f"{kind}.jsonl")
    assert list(runs["text"]) == [1, 2, 3]
    assert runs["parquet"] == runs["text"] == runs["jsonl"]  # exactly: the same tokens


# ----------------------------------------------------------------------------- hf: streams
def stream(files):
    return "hf:" + files["shards"]


def lane_documents(windows, tokenizer):
    """The documents of a lane's token stream, from its consecutive (x) windows."""
    ids = torch.cat([x.flatten() for x in windows]).tolist()
    docs, start = [], 0
    for i, t in enumerate(ids + [data.EOT_ID]):
        if t == data.EOT_ID:
            docs.append(tokenizer.decode(ids[start:i]))
            start = i + 1
    return docs[1:-1]  # the first and last may be cut by the windows


def test_stream_validation_is_its_first_val_tokens_and_their_documents_never_train(files, docs,
                                                                                 tokenizer):
    loader = StreamLoader(stream(files), batch_size=2, seq_len=8, val_tokens=100)
    whole = oracle(tokenizer, docs)
    assert loader.val.tolist() == whole[:100]
    held = [d for i, d in enumerate(docs) if len(oracle(tokenizer, docs[:i])) < 100]
    assert 0 < len(held) < N_DOCS
    trained = lane_documents([loader.next_batch()[0] for _ in range(250)], tokenizer)  # > 2 epochs
    assert set(trained) == set(docs) - set(held)


@pytest.mark.parametrize("world", [2, 3])  # 4 shards: whole shards per rank, or every 3rd example
def test_ranks_read_disjoint_documents_and_what_one_process_reads_with_grad_accum(files, docs,
                                                                                  tokenizer, world):
    spec = stream(files)
    single = StreamLoader(spec, batch_size=2, seq_len=8, grad_accum=world)
    ranks = [StreamLoader(spec, batch_size=2, seq_len=8, rank=r, world_size=world) for r in range(world)]
    seen = [[] for _ in ranks]
    for _ in range(120):  # one step: micro-step m of one process is rank m of `world`; > 2 epochs
        for r in range(world):
            x1, y1 = single.next_batch()
            x2, y2 = ranks[r].next_batch()
            assert torch.equal(x1, x2) and torch.equal(y1, y2)
            seen[r].append(x2)
    read = [set(lane_documents(windows, tokenizer)) for windows in seen]
    for r in range(world):
        assert read[r] and not read[r] & set().union(*read[:r], *read[r + 1:])
    assert set().union(*read) == set(docs)


def test_a_stream_state_resumes_exactly_across_the_end_of_its_documents(tmp_path, files):
    spec = stream(files)
    loader = StreamLoader(spec, batch_size=3, seq_len=5)
    for _ in range(120):  # past the end of the ~1,500 tokens: the lane has started over
        loader.next_batch()
    torch.save(loader.state_dict(), tmp_path / "state.pt")
    resumed = StreamLoader(spec, batch_size=3, seq_len=5)
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    again = StreamLoader(spec, batch_size=3, seq_len=5)  # resumed twice, with no read in between
    again.load_state_dict(resumed.state_dict())
    for _ in range(120):
        for a, b, c in zip(loader.next_batch(), resumed.next_batch(), again.next_batch()):
            assert torch.equal(a, b) and torch.equal(a, c)
    with pytest.raises(DataError, match=r"read 1 lanes .* this run has 2"):
        StreamLoader(spec, 3, 5, grad_accum=2).load_state_dict(loader.state_dict())
    with pytest.raises(DataError, match="trained on token files"):
        resumed.load_state_dict({"position": 0, "epoch": 0})
    with pytest.raises(DataError, match="the checkpoint streamed"):
        data.DataLoaderLite(np.zeros(100, np.uint16), 2, 8).load_state_dict(loader.state_dict())


STREAM_RUN = [*TINY, "--steps", 4, "--ckpt-interval", 2, "--eval-interval", 2, "--val-tokens", 200]


def token_caches(*folders):
    return [os.path.join(d, n) for folder in folders if os.path.isdir(folder)
            for d, _, names in os.walk(folder) for n in names if ".tokens." in n]


@pytest.fixture(scope="module")
def stream_runs(tmp_path_factory, docs):
    """4 steps streamed from parquet shards, then the same run resumed from its step-2 checkpoint."""
    folder = tmp_path_factory.mktemp("stream")
    spec = "hf:" + write_shards(folder / "shards", docs)
    home_cache = os.path.join(os.path.expanduser("~"), ".cache", "smollm2_tokens")
    before = token_caches(home_cache)
    full = run_train(folder, *STREAM_RUN, "--data", spec, "--save", "full/ckpt.pt",
                     "--metrics", "full/metrics.jsonl")
    resumed = run_train(folder, "--steps", 4, "--ckpt", "full/checkpoint_step_2.pt",
                        "--save", "resumed/ckpt.pt", "--metrics", "resumed/metrics.jsonl")
    caches = [c for c in token_caches(folder, home_cache) if c not in before]
    return folder, full, resumed, caches, spec


def test_an_hf_stream_trains_and_reports_a_validation_loss_without_a_token_cache(stream_runs):
    folder, full, _, caches, spec = stream_runs
    assert f"data: {spec} | streamed, no cache | 1 lane(s)" in full.stdout
    assert "validation tokens 200" in full.stdout and "step 4/4 | loss" in full.stdout
    records = read_metrics(folder / "full/metrics.jsonl")
    assert [r["step"] for r in records if "val_loss" in r] == [2, 4]
    assert records[-1]["loss"] < records[0]["loss"]
    assert caches == []  # streamed, never cached
    assert full.stderr == ""  # no ignored AttributeError from datasets at exit


def test_an_hf_stream_resumes_bit_for_bit_from_a_step_n_checkpoint(stream_runs):
    folder, _, resumed, _, _ = stream_runs
    full, again = read_metrics(folder / "full/metrics.jsonl"), read_metrics(folder / "resumed/metrics.jsonl")
    assert [r["step"] for r in again] == [3, 4]
    assert [(r["loss"], r["grad_norm"], r.get("val_loss")) for r in again] == \
        [(r["loss"], r["grad_norm"], r.get("val_loss")) for r in full[2:]]  # exactly
    a, b = load_ckpt(folder / "full/ckpt.pt"), load_ckpt(folder / "resumed/ckpt.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert resumed.stderr == ""


def test_torchrun_2_ranks_on_a_stream_match_one_process_with_grad_accum_2(tmp_path, files):
    args = [*STREAM_RUN, "--data", stream(files)]
    ddp = run_cmd(tmp_path, sys.executable, "-m", "torch.distributed.run", "--standalone",
                  "--nproc_per_node=2", TRAIN_PY, *args, "--save", "ddp/ckpt.pt", "--metrics", "ddp/m.jsonl")
    run_train(tmp_path, *args, "--grad-accum", 2, "--save", "single/ckpt.pt", "--metrics", "single/m.jsonl")
    resumed = run_train(tmp_path, "--steps", 4, "--ckpt", "ddp/checkpoint_step_2.pt",
                        "--save", "resumed/ckpt.pt", "--metrics", "resumed/m.jsonl")
    assert "2 lane(s) of disjoint documents" in ddp.stdout
    assert "2 x 32 tokens x 2 micro-steps x 1 processes" in resumed.stdout
    single = losses(tmp_path / "single/m.jsonl")
    assert list(single) == [1, 2, 3, 4]
    assert losses(tmp_path / "ddp/m.jsonl") == pytest.approx(single, abs=1e-5, rel=0)
    # every lane's position travelled in rank 0's checkpoint: the resumed steps match too
    assert losses(tmp_path / "resumed/m.jsonl") == pytest.approx({s: single[s] for s in (3, 4)},
                                                                 abs=1e-5, rel=0)


# ----------------------------------------------------------------------------- --val-data
def test_val_data_validates_on_another_source_and_trains_on_all_of_data(tmp_path, files, tokenizer,
                                                                        docs):
    on_file = run_train(tmp_path, *TINY, "--data", files["text"], "--val-data", files["jsonl"],
                        "--steps", 2, "--save", "a.pt", "--metrics", "a.jsonl")
    n_all = len(oracle(tokenizer, docs))
    assert f"train batches per epoch {(n_all - 1) // 64:,}, validation tokens {n_all:,} from " \
           f"{files['jsonl']}" in on_file.stdout  # the whole of --data trains: no tail held out
    from_stream = run_train(tmp_path, *TINY, "--data", files["jsonl"], "--val-data", stream(files),
                            "--val-tokens", 150, "--steps", 2, "--save", "b.pt", "--metrics", "b.jsonl")
    assert f"validation tokens 150 from {stream(files)}" in from_stream.stdout
    for name in "ab":
        assert "val_loss" in read_metrics(tmp_path / f"{name}.jsonl")[-1]


# ----------------------------------------------------------------------------- bad input
def not_json(d):
    (d / "bad.jsonl").write_text('{"text": "fine"}\n{"text": "fine"}\n{"text": oops}\n')
    return str(d / "bad.jsonl")


def empty_stream(d):
    (d / "empty").mkdir()
    (d / "empty" / "a.jsonl").write_text("")
    return f"hf:{d / 'empty'}"


BAD = {  # case: (make the data in a folder and return its --data, what stderr must say)
    "parquet without the text column": (
        lambda d: write_parquet(d / "no_text.parquet", {"id": [1, 2], "content": ["a b", "c d"]}),
        r"no_text.parquet has no column 'text' \(its columns: id, content\)"),
    "JSONL line that is not JSON": (not_json, r"bad.jsonl line 3: not JSON"),
    "JSONL line without the column": (
        lambda d: write_jsonl(d / "no_field.jsonl", [{"text": "fine"}, {"content": "x"}]),
        r"no_field.jsonl line 2: no 'text' field \(it has: content\)"),
    "unknown hub dataset": (
        lambda d: "hf:nobody-here/no-such-dataset",
        r"hf:nobody-here/no-such-dataset: cannot stream it \(ConnectionError: Couldn't reach"),
    "empty stream": (empty_stream, r"the stream is empty"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_data_is_one_line_on_stderr_and_exit_2(tmp_path, case):
    make, message = BAD[case]
    spec = make(tmp_path)
    proc = run_train(tmp_path, *TINY, "--data", spec, "--steps", 1, status=2)
    assert proc.stderr.startswith("train.py: error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert re.search(message, proc.stderr), proc.stderr
    assert not os.path.exists(tmp_path / "checkpoint.pt")
