"""smollm2/loaders.py: DataLoaderLite's batches are contiguous windows with shifted targets that wrap,
resume exactly and read across ranks what one process reads; split_train_val holds out the tail; and
StreamLoader's hf: streams train, validate and resume exactly, ranks read disjoint documents, and
train.py (load_data) validates on --val-data."""
import os
import sys

import numpy as np
import pytest
import torch

from conftest import TINY, TRAIN_PY, load_ckpt, losses, read_metrics, run_cmd, run_train
from smollm2.errors import DataError
from smollm2.loaders import DataLoaderLite, StreamLoader, split_train_val
from smollm2.token_cache import dataset_stats
from smollm2.tokenizer import EOT_ID
from test_documents import N_DOCS, docs, files, needs_rows, oracle, tokenizer, write_shards  # noqa: F401 (fixtures)


# ----------------------------------------------------------------------------- token files
def test_stats_and_train_val_split():
    tokens = np.array([5, 6, 0, 7, 5, 0, 8, 9, 5, 6], dtype=np.uint16)
    assert dataset_stats(tokens) == {"tokens": 10, "unique_tokens": 6, "documents": 3}
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


# ----------------------------------------------------------------------------- hf: streams
def stream(files):
    return "hf:" + files["shards"]


def lane_documents(windows, tokenizer):
    """The documents of a lane's token stream, from its consecutive (x) windows."""
    ids = torch.cat([x.flatten() for x in windows]).tolist()
    docs, start = [], 0
    for i, t in enumerate(ids + [EOT_ID]):
        if t == EOT_ID:
            docs.append(tokenizer.decode(ids[start:i]))
            start = i + 1
    return docs[1:-1]  # the first and last may be cut by the windows


@needs_rows
def test_stream_validation_is_its_first_val_tokens_and_their_documents_never_train(files, docs,
                                                                                 tokenizer):
    loader = StreamLoader(stream(files), batch_size=2, seq_len=8, val_tokens=100)
    whole = oracle(tokenizer, docs)
    assert loader.val.tolist() == whole[:100]
    held = [d for i, d in enumerate(docs) if len(oracle(tokenizer, docs[:i])) < 100]
    assert 0 < len(held) < N_DOCS
    trained = lane_documents([loader.next_batch()[0] for _ in range(250)], tokenizer)  # > 2 epochs
    assert set(trained) == set(docs) - set(held)


@needs_rows
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


@needs_rows
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
        DataLoaderLite(np.zeros(100, np.uint16), 2, 8).load_state_dict(loader.state_dict())


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
    resumed = run_train(folder, "--steps", 4, "--ckpt", "full/ckpt_step_2.pt",
                        "--save", "resumed/ckpt.pt", "--metrics", "resumed/metrics.jsonl")
    caches = [c for c in token_caches(folder, home_cache) if c not in before]
    return folder, full, resumed, caches, spec


@needs_rows
def test_an_hf_stream_trains_and_reports_a_validation_loss_without_a_token_cache(stream_runs):
    folder, full, _, caches, spec = stream_runs
    assert f"data: {spec} | streamed, no cache | 1 lane(s)" in full.stdout
    assert "validation tokens 200" in full.stdout and "step 4/4 | loss" in full.stdout
    records = read_metrics(folder / "full/metrics.jsonl")
    assert [r["step"] for r in records if "val_loss" in r] == [2, 4]
    assert records[-1]["loss"] < records[0]["loss"]
    assert caches == []  # streamed, never cached
    assert full.stderr == ""  # no ignored AttributeError from datasets at exit


@needs_rows
def test_an_hf_stream_resumes_bit_for_bit_from_a_step_n_checkpoint(stream_runs):
    folder, _, resumed, _, _ = stream_runs
    full, again = read_metrics(folder / "full/metrics.jsonl"), read_metrics(folder / "resumed/metrics.jsonl")
    assert [r["step"] for r in again] == [3, 4]
    assert [(r["loss"], r["grad_norm"], r.get("val_loss")) for r in again] == \
        [(r["loss"], r["grad_norm"], r.get("val_loss")) for r in full[2:]]  # exactly
    a, b = load_ckpt(folder / "full/ckpt.pt"), load_ckpt(folder / "resumed/ckpt.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert resumed.stderr == ""


@needs_rows
def test_torchrun_2_ranks_on_a_stream_match_one_process_with_grad_accum_2(tmp_path, files):
    args = [*STREAM_RUN, "--data", stream(files)]
    ddp = run_cmd(tmp_path, sys.executable, "-m", "torch.distributed.run", "--standalone",
                  "--nproc_per_node=2", TRAIN_PY, *args, "--save", "ddp/ckpt.pt", "--metrics", "ddp/m.jsonl")
    run_train(tmp_path, *args, "--grad-accum", 2, "--save", "single/ckpt.pt", "--metrics", "single/m.jsonl")
    resumed = run_train(tmp_path, "--steps", 4, "--ckpt", "ddp/ckpt_step_2.pt",
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
@needs_rows
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
