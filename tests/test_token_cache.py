"""smollm2/token_cache.py: tokenize_corpus gives exactly the ids of whole-text encoding however the
text is chunked; its cache (beside the data, or in ~/.cache when that is read-only) is hit on a second
call, keyed by fingerprint() (the files, the tokenizer and the text column), missed on a change, and
rebuilt with a notice when damaged, also under train.py."""
import os
import random
import shutil

import numpy as np
import pytest

from conftest import TINY, losses, run_train
from smollm2 import documents, token_cache
from smollm2.errors import DataError
from smollm2.token_cache import tokenize_corpus
from smollm2.tokenizer import EOT_ID, load_tokenizer
from test_documents import INPUT, docs, needs_rows, oracle, write, write_parquet  # noqa: F401 (docs: a fixture)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="module")
def shakespeare_ids(tokenizer):
    with open(INPUT, encoding="utf-8") as f:
        return tokenizer.encode(f.read()).ids


def test_input_txt_gives_the_whole_text_encoding(tmp_path, shakespeare_ids):
    tokens = tokenize_corpus(INPUT, cache_dir=tmp_path, progress=False)
    assert tokens.dtype == np.uint16 and tokens.ndim == 1
    assert len(tokens) == 341_094
    assert tokens.tolist() == shakespeare_ids


def test_small_chunks_give_the_same_stream(tmp_path, shakespeare_ids):
    tokens = tokenize_corpus(INPUT, cache_dir=tmp_path, progress=False, chunk_bytes=300)
    assert tokens.tolist() == shakespeare_ids


def test_directory_and_glob_join_sorted_files_with_eot_between(tmp_path, tokenizer):
    texts = {"b.txt": "Second file.\nIt has two lines.", "a.txt": "First file here.\n",
             "c.txt": "Third, and last."}
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for name, text in texts.items():
        write(corpus / name, text)
    expected = []
    for name in sorted(texts):
        expected += ([EOT_ID] if expected else []) + tokenizer.encode(texts[name]).ids
    from_dir = tokenize_corpus(str(corpus), cache_dir=tmp_path / "c1", progress=False)
    from_glob = tokenize_corpus(str(corpus / "*.txt"), cache_dir=tmp_path / "c2", progress=False)
    assert from_dir.tolist() == expected == from_glob.tolist()
    assert from_dir[0] != EOT_ID and from_dir[-1] != EOT_ID
    assert token_cache.dataset_stats(from_dir)["documents"] == 3


def test_default_cache_sits_beside_the_data_and_is_skipped_as_data(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    write(corpus / "a.txt", "one")
    write(corpus / "b.txt", "two")
    first = tokenize_corpus(str(corpus), progress=False)
    caches = [n for n in os.listdir(corpus) if n.endswith(".bin")]
    assert len(caches) == 1 and caches[0].startswith("corpus.tokens.")
    assert documents.resolve_files(str(corpus)) == [str(corpus / "a.txt"), str(corpus / "b.txt")]
    assert tokenize_corpus(str(corpus), progress=False).tolist() == first.tolist()


def test_second_call_hits_the_cache_and_a_changed_file_misses_it(tmp_path, monkeypatch):
    path = write(tmp_path / "story.txt", "Once upon a time.\nThe end.")
    tokenize_corpus(path, progress=False)
    (cache,) = [n for n in os.listdir(tmp_path) if n.startswith("story.txt.tokens.")]
    assert cache.endswith(".bin")  # *.tokens.*.bin: ignored by git

    calls = []
    real = token_cache._tokenize_to
    monkeypatch.setattr(token_cache, "_tokenize_to", lambda *a: (calls.append(a), real(*a)))
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
        body[token_cache.CACHE_HEADER.size + 100] ^= 1
    with open(cache, "wb") as f:
        f.write(body)


@pytest.mark.parametrize("how", ["random bytes", "truncated", "one id changed"])
def test_a_damaged_cache_is_rebuilt_with_a_notice(tmp_path, capsys, how):
    path = write(tmp_path / "story.txt", "Once upon a time there was a cache.\n" * 50)
    clean = tokenize_corpus(path, progress=False).tolist()
    (cache,) = tmp_path.glob("story.txt.tokens.*.bin")
    assert cache.stat().st_size == token_cache.CACHE_HEADER.size + 2 * len(clean)  # the header, then the ids
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
    assert cache.name == f"story.txt.tokens.{token_cache.fingerprint(path)}.bin"
    before = token_cache.fingerprint(path)
    write(path, "Once upon a time, again.")
    assert token_cache.fingerprint(path) != before


@needs_rows
def test_the_cache_key_covers_the_text_column(tmp_path, docs, tokenizer):
    path = write_parquet(tmp_path / "two.parquet", {"text": docs, "title": [d[:20] for d in docs]})
    cache = tmp_path / "cache"
    body = tokenize_corpus(path, cache_dir=cache, progress=False)
    assert len(os.listdir(cache)) == 1
    assert tokenize_corpus(path, cache_dir=cache, progress=False).tolist() == body.tolist()  # a hit
    titles = tokenize_corpus(path, cache_dir=cache, progress=False, text_column="title")
    assert len(os.listdir(cache)) == 2
    assert titles.tolist() == oracle(tokenizer, [d[:20] for d in docs])


def test_read_only_data_directory_caches_in_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    shutil.copy(INPUT, tmp_path / "input.txt")
    monkeypatch.setattr(token_cache.os, "access", lambda *a: False)
    tokens = tokenize_corpus(str(tmp_path / "input.txt"), progress=False)
    assert len(tokens) == 341_094
    assert os.listdir(tmp_path / "home" / ".cache" / "smollm2_tokens")


# ----------------------------------------------------------------------------- conversations
def test_conversations_without_an_answer_are_skipped_and_counted_and_none_answered_leaves_no_cache(tmp_path):
    import json
    from smollm2.token_cache import tokenize_conversations
    answered = {"messages": [{"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "4."}]}
    unanswered = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]}
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [unanswered, answered, unanswered, answered]))
    conv = tokenize_conversations(str(path), progress=False)
    assert (conv.count, conv.skipped) == (2, 2)
    assert "conversations 2 (" in conv.describe() and "2 without an assistant turn skipped" in conv.describe()
    again = tokenize_conversations(str(path), progress=False)  # from the cache: the count kept
    assert again.skipped == 2 and np.array_equal(again.tokens, conv.tokens)
    (tmp_path / "none").mkdir()
    path = tmp_path / "none" / "chat.jsonl"
    path.write_text(json.dumps(unanswered) + "\n")
    with pytest.raises(DataError, match=r"no conversation in .* has an assistant turn \(1 skipped\)"):
        tokenize_conversations(str(path), progress=False)
    assert os.listdir(tmp_path / "none") == ["chat.jsonl"]  # nothing half-written left behind


def test_the_conversation_cache_key_covers_the_chat_template(tmp_path):
    import json
    from smollm2.token_cache import tokenize_conversations
    from test_chat import OTHER, tokenizer_folder
    (tmp_path / "data").mkdir()
    path = tmp_path / "data" / "chat.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "2 + 2?"},
                                             {"role": "assistant", "content": "4."}]}) + "\n")
    repos = tokenize_conversations(str(path), progress=False)
    other = tokenize_conversations(str(path), tokenizer_dir=tokenizer_folder(tmp_path / "tok", OTHER), progress=False)
    assert len(list((tmp_path / "data").glob("chat.jsonl.tokens.*.conv.bin"))) == 2  # one cache per template
    assert other.tokens.tolist() != repos.tokens.tolist() and other.mask.sum() == repos.mask.sum()
