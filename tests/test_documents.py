"""smollm2/documents.py: the files a --data names and the documents in them. Parquet rows and JSONL
lines (gzipped or not, one file or a folder of shards) give exactly the ids of a folder of text files,
in training too; parquet is read one row group of the text column at a time; and bad data (a missing
file, text that is not UTF-8, a missing column, an hf: stream that cannot be opened) is one line.

The documents and writers here (docs, files, oracle, write_*) serve test_tokenizer.py,
test_token_cache.py and test_loaders.py too."""
import gzip
import importlib.util
import json
import os
import re

import numpy as np
import pytest

from conftest import ROOT, TINY, losses, run_train
from smollm2.errors import DataError
from smollm2.token_cache import dataset_stats, tokenize_corpus
from smollm2.tokenizer import EOT_ID, load_tokenizer

INPUT = os.path.join(ROOT, "input.txt")
N_DOCS = 40
# pyarrow (parquet) and datasets (hf: streams) are optional at runtime; requirements-dev.txt has them
ROWS = all(importlib.util.find_spec(m) for m in ("pyarrow", "datasets"))
needs_rows = pytest.mark.skipif(not ROWS, reason="needs pyarrow and datasets (requirements-dev.txt)")
if ROWS:
    import pyarrow as pa
    import pyarrow.parquet as pq


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="module")
def docs():
    """40 distinct paragraphs of tiny Shakespeare (about 1,500 tokens in all)."""
    with open(INPUT, encoding="utf-8") as f:
        paragraphs = [p for p in f.read(40_000).split("\n\n") if p.strip()]
    assert len(set(paragraphs[:N_DOCS])) == N_DOCS
    return paragraphs[:N_DOCS]


def oracle(tokenizer, docs):
    """What the issue asks for, from the tokenizer alone: each document's ids, EOT between them."""
    ids = []
    for doc in docs:
        ids += ([EOT_ID] if ids else []) + tokenizer.encode(doc).ids
    return ids


def write(path, text):
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write(text)
    return str(path)


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


# ----------------------------------------------------------------------------- text files
def test_bad_inputs_raise_one_line_data_errors(tmp_path):
    with pytest.raises(DataError, match="no such file or directory"):
        tokenize_corpus(str(tmp_path / "missing.txt"), progress=False)
    with pytest.raises(DataError, match="no data files"):
        tokenize_corpus(str(tmp_path / "*.none"), progress=False)
    with pytest.raises(DataError, match="empty.txt is empty"):
        tokenize_corpus(write(tmp_path / "empty.txt", ""), progress=False)
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\u00e9 au lait".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.txt is not UTF-8 text \(bad byte at offset 3\)"):
        tokenize_corpus(str(latin1), progress=False)
    binary = tmp_path / "weights.txt"
    binary.write_bytes(b"PK\x03\x04" + bytes(range(256)))
    with pytest.raises(DataError, match="weights.txt looks binary"):
        tokenize_corpus(str(binary), progress=False)
    with pytest.raises(DataError, match="tokenizer not found"):
        tokenize_corpus(INPUT, tokenizer_dir=str(tmp_path), progress=False)
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".bin")]  # no half-written caches


# ----------------------------------------------------------------------------- row files
@needs_rows
def test_parquet_and_jsonl_rows_give_exactly_the_ids_of_a_folder_of_text_files(tmp_path, files, docs,
                                                                                tokenizer):
    expected = np.array(oracle(tokenizer, docs), dtype=np.uint16)
    glob_of_shards = os.path.join(files["shards"], "part*.parquet")
    for kind in ("text", "parquet", "jsonl", "jsonl.gz", "shards"):
        tokens = tokenize_corpus(files[kind], cache_dir=tmp_path / kind, progress=False)
        np.testing.assert_array_equal(tokens, expected, err_msg=kind)
    np.testing.assert_array_equal(tokenize_corpus(glob_of_shards, cache_dir=tmp_path / "g",
                                                  progress=False), expected)
    assert dataset_stats(expected)["documents"] == N_DOCS


@needs_rows
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


@needs_rows
def test_a_3_step_run_on_parquet_or_jsonl_has_the_losses_of_the_text_folder(tmp_path, files):
    runs = {}
    for kind in ("text", "parquet", "jsonl"):
        run_train(tmp_path, *TINY, "--data", files[kind], "--steps", 3, "--save", f"{kind}.pt",
                  "--metrics", f"{kind}.jsonl")
        runs[kind] = losses(tmp_path / f"{kind}.jsonl")
    assert list(runs["text"]) == [1, 2, 3]
    assert runs["parquet"] == runs["text"] == runs["jsonl"]  # exactly: the same tokens


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


@needs_rows
@pytest.mark.parametrize("case", BAD)
def test_bad_data_is_one_line_on_stderr_and_exit_2(tmp_path, case):
    make, message = BAD[case]
    spec = make(tmp_path)
    proc = run_train(tmp_path, *TINY, "--data", spec, "--steps", 1, status=2)
    assert proc.stderr.startswith("train.py: error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert re.search(message, proc.stderr), proc.stderr
    assert not os.path.exists(tmp_path / "checkpoint.pt")
