"""data.py: streaming tokenisation equals whole-text encoding, the cache, the loader's batches."""
import os
import random
import shutil

import numpy as np
import pytest
import torch

import data
import sources
from conftest import TINY, losses, run_train
from data import DataError, DataLoaderLite, split_train_val, tokenize_corpus

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INPUT = os.path.join(ROOT, "input.txt")


@pytest.fixture(scope="module")
def tokenizer():
    return data.load_tokenizer()


@pytest.fixture(scope="module")
def shakespeare_ids(tokenizer):
    with open(INPUT, encoding="utf-8") as f:
        return tokenizer.encode(f.read()).ids


def write(path, text):
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write(text)
    return str(path)


def test_input_txt_gives_the_whole_text_encoding(tmp_path, shakespeare_ids):
    tokens = tokenize_corpus(INPUT, cache_dir=tmp_path, progress=False)
    assert tokens.dtype == np.uint16 and tokens.ndim == 1
    assert len(tokens) == 341_094
    assert tokens.tolist() == shakespeare_ids


def test_small_chunks_give_the_same_stream(tmp_path, shakespeare_ids):
    tokens = tokenize_corpus(INPUT, cache_dir=tmp_path, progress=False, chunk_bytes=300)
    assert tokens.tolist() == shakespeare_ids


def test_cuts_and_segments_never_change_tokens_on_tricky_text(tmp_path, tokenizer):
    # every kind of space the regexes might disagree on, CRLF, contractions, non-Latin words,
    # emoji and special tokens, cut into pieces as small as one byte
    alphabet = list("ab Z9'.,!-\n\t\r\x0b\x0c\x1c\x85\xa0\u1680\u180e\u200b\u2003")
    alphabet += ["\u2028", "\u3000"]
    alphabet += ["\ufeff", "é", "日本", "слово", "'s", " 'll", "🙂", "<|endoftext|>", "12345", "\r\n",
                 "  \n", "\n\n", " der ", "。\n"]
    rng = random.Random(0)
    for trial in range(200):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 300)))
        path = write(tmp_path / f"t{trial}.txt", text)
        expected = tokenizer.encode(text).ids
        for chunk_bytes in (1, 3, 16, 1000):
            pieces = [t for _, t in sources.text_pieces(path, chunk_bytes)]
            assert "".join(pieces) == text
            encode = data._SegmentEncoder(tokenizer)
            ids = np.frombuffer(b"".join(map(encode, pieces)), dtype=np.uint16).tolist()
            assert ids == expected, (text, chunk_bytes)


def test_directory_and_glob_join_sorted_files_with_eot_between(tmp_path, tokenizer):
    texts = {"b.txt": "Second file.\nIt has two lines.", "a.txt": "First file here.\n",
             "c.txt": "Third, and last."}
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name, text in texts.items():
        write(corpus / name, text)
    expected = []
    for name in sorted(texts):
        expected += ([data.EOT_ID] if expected else []) + tokenizer.encode(texts[name]).ids
    from_dir = tokenize_corpus(str(corpus), cache_dir=tmp_path / "c1", progress=False)
    from_glob = tokenize_corpus(str(corpus / "*.txt"), cache_dir=tmp_path / "c2", progress=False)
    assert from_dir.tolist() == expected == from_glob.tolist()
    assert from_dir[0] != data.EOT_ID and from_dir[-1] != data.EOT_ID
    assert data.dataset_stats(from_dir)["documents"] == 3


def test_default_cache_sits_beside_the_data_and_is_skipped_as_data(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write(corpus / "a.txt", "one")
    write(corpus / "b.txt", "two")
    first = tokenize_corpus(str(corpus), progress=False)
    caches = [n for n in os.listdir(corpus) if n.endswith(".bin")]
    assert len(caches) == 1 and caches[0].startswith("corpus.tokens.")
    assert data.resolve_files(str(corpus)) == [str(corpus / "a.txt"), str(corpus / "b.txt")]
    assert tokenize_corpus(str(corpus), progress=False).tolist() == first.tolist()


def test_second_call_hits_the_cache_and_a_changed_file_misses_it(tmp_path, monkeypatch):
    path = write(tmp_path / "story.txt", "Once upon a time.\nThe end.")
    tokenize_corpus(path, progress=False)
    (cache,) = [n for n in os.listdir(tmp_path) if n.startswith("story.txt.tokens.")]
    assert cache.endswith(".bin")  # *.tokens.*.bin: ignored by git

    calls = []
    real = data._tokenize_to
    monkeypatch.setattr(data, "_tokenize_to", lambda *a: (calls.append(a), real(*a)))
    again = tokenize_corpus(path, progress=False)
    assert calls == [] and len(again) > 0

    write(path, "Once upon a time.\nThe end, changed.")
    changed = tokenize_corpus(path, progress=False)
    assert len(calls) == 1
    assert changed.tolist() != again.tolist()


def damage_cache(cache, how):
    body = bytearray(open(cache, "rb").read())
    if how == "random bytes":
        body = random.Random(0).randbytes(len(body))
    elif how == "truncated":
        body = body[:len(body) // 3]
    else:  # one id changed: header and size still agree, only the checksum catches it
        body[data.CACHE_HEADER.size + 100] ^= 1
    with open(cache, "wb") as f:
        f.write(body)


@pytest.mark.parametrize("how", ["random bytes", "truncated", "one id changed"])
def test_a_damaged_cache_is_rebuilt_with_a_notice(tmp_path, capsys, how):
    path = write(tmp_path / "story.txt", "Once upon a time there was a cache.\n" * 50)
    clean = tokenize_corpus(path, progress=False).tolist()
    (cache,) = tmp_path.glob("story.txt.tokens.*.bin")
    assert cache.stat().st_size == data.CACHE_HEADER.size + 2 * len(clean)  # the header, then the ids
    damage_cache(cache, how)
    capsys.readouterr()
    assert tokenize_corpus(path, progress=False).tolist() == clean
    err = capsys.readouterr().err
    assert f"token cache {cache} is damaged (" in err and "): rebuilding it" in err
    assert tokenize_corpus(path, progress=False).tolist() == clean
    assert "damaged" not in capsys.readouterr().err  # rebuilt whole: trusted again


@pytest.fixture(scope="module")
def clean_run(tmp_path_factory, corpus):
    """Losses of 3 tiny steps on the corpus with a freshly built cache."""
    folder = tmp_path_factory.mktemp("clean")
    shutil.copy(corpus, folder / "text.txt")
    run_train(folder, *TINY, "--data", "text.txt", "--steps", 3, "--save", "run/ckpt.pt",
              "--metrics", "run/m.jsonl")
    return folder, losses(folder / "run/m.jsonl")


@pytest.mark.parametrize("how", ["random bytes", "truncated"])
def test_training_on_a_damaged_cache_rebuilds_it_and_trains_on_the_clean_tokens(clean_run, how):
    folder, clean = clean_run
    (cache,) = folder.glob("text.txt.tokens.*.bin")
    damage_cache(cache, how)
    proc = run_train(folder, *TINY, "--data", "text.txt", "--steps", 3, "--save", f"{how}/ckpt.pt",
                     "--metrics", f"{how}/m.jsonl")
    assert "is damaged" in proc.stderr and "rebuilding it" in proc.stderr and "Traceback" not in proc.stderr
    assert losses(folder / how / "m.jsonl") == clean  # exactly the same tokens


def test_fingerprint_is_the_cache_key_and_changes_with_the_data(tmp_path):
    path = write(tmp_path / "story.txt", "Once upon a time.")
    tokenize_corpus(path, progress=False)
    (cache,) = tmp_path.glob("story.txt.tokens.*.bin")
    assert cache.name == f"story.txt.tokens.{data.fingerprint(path)}.bin"
    before = data.fingerprint(path)
    write(path, "Once upon a time, again.")
    assert data.fingerprint(path) != before


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


def test_read_only_data_directory_caches_in_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    shutil.copy(INPUT, tmp_path / "input.txt")
    monkeypatch.setattr(data.os, "access", lambda *a: False)
    tokens = tokenize_corpus(str(tmp_path / "input.txt"), progress=False)
    assert len(tokens) == 341_094
    assert os.listdir(tmp_path / "home" / ".cache" / "smollm2_tokens")


def test_stats_and_train_val_split():
    tokens = np.array([5, 6, 0, 7, 5, 0, 8, 9, 5, 6], dtype=np.uint16)
    assert data.dataset_stats(tokens) == {"tokens": 10, "unique_tokens": 6, "documents": 3}
    train, val = split_train_val(tokens, 0.2)
    assert train.tolist() == [5, 6, 0, 7, 5, 0, 8, 9] and val.tolist() == [5, 6]
    assert len(split_train_val(tokens, 0.0)[1]) == 0
    for bad in (-0.1, 1.0):
        with pytest.raises(DataError, match=r"val_frac must be in \[0, 1\)"):
            split_train_val(tokens, bad)


def test_batches_are_contiguous_windows_with_shifted_targets():
    tokens = np.arange(100, dtype=np.uint16)
    loader = DataLoaderLite(tokens, batch_size=2, seq_len=4)
    x, y = loader.next_batch()
    assert x.shape == y.shape == (2, 4) and x.dtype == y.dtype == torch.int64
    assert x.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert torch.equal(y, x + 1)
    assert loader.next_batch()[0][0].tolist() == [8, 9, 10, 11]


def test_loader_wraps_to_the_start_after_an_epoch():
    tokens = np.arange(25, dtype=np.uint16)  # room for 3 batches of 8 (+1 target)
    loader = DataLoaderLite(tokens, batch_size=2, seq_len=4)
    assert loader.batches_per_epoch == 3
    firsts = [loader.next_batch()[0][0, 0].item() for _ in range(4)]
    assert firsts == [0, 8, 16, 0]
    assert loader.state_dict() == {"position": 8, "epoch": 1}


def test_state_dict_round_trip_continues_identically(tmp_path):
    tokens = np.arange(1000, dtype=np.uint16) % 97
    loader = DataLoaderLite(tokens, batch_size=3, seq_len=5)
    for _ in range(70):  # past one epoch
        loader.next_batch()
    torch.save(loader.state_dict(), tmp_path / "state.pt")
    resumed = DataLoaderLite(tokens, batch_size=3, seq_len=5)
    resumed.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    for _ in range(70):
        for a, b in zip(loader.next_batch(), resumed.next_batch()):
            assert torch.equal(a, b)
    with pytest.raises(DataError, match="outside these 1000 tokens"):
        resumed.load_state_dict({"position": 5000, "epoch": 0})


def test_two_ranks_read_what_one_rank_reads_in_two_calls():
    # 513 = 16 global batches of 2x2x8 (+1): both set-ups wrap at the same token. Otherwise the
    # last micro-batches of an epoch differ (the one-process loader wraps per 2x8 window).
    tokens = np.random.default_rng(0).integers(0, 49152, 513).astype(np.uint16)
    single = DataLoaderLite(tokens, batch_size=2, seq_len=8)
    ranks = [DataLoaderLite(tokens, 2, 8, rank=r, world_size=2) for r in range(2)]
    assert ranks[0].batches_per_epoch * 2 == single.batches_per_epoch
    for _ in range(40):  # several epochs
        for r in range(2):
            x1, y1 = single.next_batch()
            x2, y2 = ranks[r].next_batch()
            assert torch.equal(x1, x2) and torch.equal(y1, y2)
    # the state is a global token offset: a 2-rank checkpoint resumes in one process
    assert ranks[0].state_dict() == ranks[1].state_dict() == single.state_dict()
    resumed = DataLoaderLite(tokens, batch_size=2, seq_len=8)
    resumed.load_state_dict(ranks[1].state_dict())
    for r in range(2):
        assert torch.equal(resumed.next_batch()[0], ranks[r].next_batch()[0])


def test_too_little_data_says_how_much_is_needed():
    with pytest.raises(DataError, match="need 65 tokens .* have 64"):
        DataLoaderLite(np.zeros(64, dtype=np.uint16), batch_size=4, seq_len=8, world_size=2)
