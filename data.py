"""Training data: text, parquet or JSONL files -> a cached uint16 token file -> (x, y) batches.

tokenize_corpus() streams the files' documents (sources.py reads them: a text file is one, each
parquet or JSONL row is one) through the SmolLM2 tokenizer piece by piece (never the whole corpus
in RAM), giving exactly the ids of tokenizer.encode() on each whole document, and caches them
beside the data, keyed by a hash of the files' contents, of tokenizer.json and of the text column
(fingerprint()), so a second run starts at once; its header holds a checksum, and a damaged cache is
rebuilt. <|endoftext|> (id 0) goes between documents.
DataLoaderLite serves contiguous windows from the memory-mapped tokens, sharded across DDP ranks
the way nanoGPT does, with a state (a global token offset) for exact resume.
"""
import glob
import hashlib
import os
import re
import struct
import sys

import numpy as np
import torch
from tokenizers import Tokenizer

import sources  # sources imports us too: only its attributes at call time, never at import

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_TOKENIZER = os.path.join(HERE, "tokenizer")
EOT_ID = 0  # <|endoftext|>
CHUNK_BYTES = 1 << 20  # text read and encoded at a time
SEGMENT_CACHE = 1_000_000  # distinct segments remembered (~150 MB) before it starts over
CACHE_FORMAT = b"smollm2-tokens-v2: header, uint16, EOT between files"  # bump if the layout changes
# A cache file starts with its magic, its token count and a blake2b of the ids' bytes, checked at
# every load (reading it back costs next to nothing beside tokenising): a damaged one is rebuilt.
CACHE_HEADER = struct.Struct("<8sQ16s")
CACHE_MAGIC = b"SMOLTOK2"
_CACHE_NAME = re.compile(r".*\.tokens\..*\.bin$")  # our cache files (and .gitignore's pattern)
# Safe cut: before a single " " or "\n" between two non-space characters. The byte-level
# pre-tokeniser's regex never joins a non-space character to the whitespace after it, and a lone
# space or newline before a non-space starts a pre-token of its own (" word", "\n"), so every
# pre-token, and hence every token, comes out the same as from the whole text. Python's \s covers
# every character the tokenizer's regex counts as space (and a few more), so \S is safe here.
# Checked for every Unicode character on both sides (tokenizers 0.23); tests fuzz it too.
_CUT = re.compile(r"(?<=\S)(?=[ \n]\S)")


class DataError(ValueError):
    """Bad training data or arguments; the message is one line a CLI can print as-is."""


def _tokenizer_file(path):
    file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise DataError(f"tokenizer not found: {file} (expected a tokenizer.json or its directory)")
    return file


def load_tokenizer(path=DEFAULT_TOKENIZER):
    """The tokenizer from a tokenizer.json file or a directory holding one."""
    return Tokenizer.from_file(_tokenizer_file(path))


def resolve_files(spec):
    """The sorted list of files named by spec: one file, a directory (its regular files, not
    recursive, skipping hidden files and token caches) or a glob pattern (** recurses)."""
    if os.path.isfile(spec):
        return [spec]
    if os.path.isdir(spec):
        files = [os.path.join(spec, n) for n in os.listdir(spec) if not n.startswith(".")]
    elif glob.has_magic(spec):
        files = glob.glob(spec, recursive=True)
    else:
        raise DataError(f"no such file or directory: {spec}")
    files = sorted(f for f in files
                   if os.path.isfile(f) and not _CACHE_NAME.match(os.path.basename(f)))
    if not files:
        raise DataError(f"no data files in {spec} (expected text, .parquet or .jsonl[.gz] files)")
    return files


def _file_digest(path, h):
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)


def fingerprint(spec, tokenizer_dir=DEFAULT_TOKENIZER, column="text"):
    """The data's identity, the token cache's key: a hex blake2b over CACHE_FORMAT, tokenizer.json,
    every file's size and bytes and (for parquet/JSONL) the text column. Checkpoints record it to
    tell when the data has changed. A hub stream (hf:...) has no files to hash: its name is its identity."""
    if sources.is_stream(spec):
        return f"{spec} (column {column})"
    return _digest(resolve_files(spec), _tokenizer_file(tokenizer_dir), column)


_DIGESTS = {}  # (files, their stats, column) -> digest: the cache and the checkpoint hash a corpus once


def _digest(files, tokenizer_file, column="text"):
    rows = any(map(sources.is_row_file, files))  # text-only corpora keep the keys they had
    stats = (rows and column,) + tuple((f, s.st_size, s.st_mtime_ns, s.st_ino)
                                        for f in (tokenizer_file, *files) for s in [os.stat(f)])
    if stats not in _DIGESTS:
        h = hashlib.blake2b(CACHE_FORMAT, digest_size=8)
        _file_digest(tokenizer_file, h)
        if rows:
            h.update(b"column:" + column.encode())
        for f in files:
            h.update(os.path.getsize(f).to_bytes(8, "little"))
            _file_digest(f, h)
        _DIGESTS[stats] = h.hexdigest()
    return _DIGESTS[stats]


def _cache_path(files, tokenizer_file, cache_dir, column="text"):
    """<name>.tokens.<hash>.bin, the hash over the tokenizer, every file's size and bytes, and the
    text column where a file has rows."""
    digest = _digest(files, tokenizer_file, column)
    name = os.path.basename(files[0]) if len(files) == 1 else "corpus"
    if cache_dir is None:
        cache_dir = os.path.commonpath([os.path.dirname(os.path.abspath(f)) for f in files])
        if not os.access(cache_dir, os.W_OK):  # read-only data: cache in the user's home instead
            cache_dir = os.path.join(os.path.expanduser("~"), ".cache", "smollm2_tokens")
    return os.path.join(cache_dir, f"{name}.tokens.{digest}.bin")


def tokenize_corpus(spec, tokenizer_dir=DEFAULT_TOKENIZER, cache_dir=None, progress=True,
                    chunk_bytes=CHUNK_BYTES, text_column="text"):
    """Token ids of the files in spec as a read-only uint16 memmap, tokenizing only on a cache miss.

    The cache goes in cache_dir, by default the (common) directory of the data files. A parquet or
    JSONL row's document is its text_column."""
    files = resolve_files(spec)
    tokenizer = load_tokenizer(tokenizer_dir)
    if tokenizer.get_vocab_size() > 65536:
        raise DataError(f"vocab of {tokenizer.get_vocab_size()} tokens does not fit in uint16")
    for f in files:
        if os.path.getsize(f) == 0:
            raise DataError(f"{f} is empty (expected a text file with at least one token)")
    cache = _cache_path(files, _tokenizer_file(tokenizer_dir), cache_dir, text_column)
    if not os.path.exists(cache) or not _cache_is_whole(cache):
        _tokenize_to(cache, files, tokenizer, chunk_bytes, progress, text_column)
    elif progress:
        print(f"tokens from cache {cache}", file=sys.stderr)
    return np.memmap(cache, dtype=np.uint16, mode="r", offset=CACHE_HEADER.size)


def _cache_is_whole(cache):
    """Whether the cache's header, size and checksum agree; if not, says so on stderr."""
    problem = None
    try:
        with open(cache, "rb") as f:
            head, size = f.read(CACHE_HEADER.size), os.fstat(f.fileno()).st_size
            magic, count, digest = CACHE_HEADER.unpack(head) if len(head) == CACHE_HEADER.size else (b"", 0, b"")
            if magic != CACHE_MAGIC or count == 0:
                problem = "no valid header"
            elif size != CACHE_HEADER.size + 2 * count:
                problem = f"{size:,} bytes where its header says {CACHE_HEADER.size + 2 * count:,}"
            else:
                h = hashlib.blake2b(digest_size=16)
                while block := f.read(1 << 24):
                    h.update(block)
                problem = None if h.digest() == digest else "the checksum of its ids does not match"
    except OSError as e:
        problem = f"unreadable: {e}"
    if problem:
        print(f"token cache {cache} is damaged ({problem}): rebuilding it", file=sys.stderr, flush=True)
    return problem is None


class _SegmentEncoder:
    """Encodes text cut at every safe cut (_CUT) into short segments (" the", " Citizen:",
    "\nAll"), each distinct one only once. Text repeats its segments, so this is several times
    faster than handing the tokenizer whole pieces (and it gets slower per MB on long strings)."""

    def __init__(self, tokenizer):
        # encode_batch_fast skips offsets we do not need; tokenizers < 0.20 lacks it
        self.encode_batch = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
        self.cache = {}  # segment -> its ids as uint16 bytes

    def __call__(self, text):
        segments = _CUT.split(text)
        if len(self.cache) > SEGMENT_CACHE:
            self.cache.clear()
        new = list(set(segments).difference(self.cache))  # any order: each is encoded alone
        for segment, enc in zip(new, self.encode_batch(new, add_special_tokens=False)):
            self.cache[segment] = np.array(enc.ids, dtype=np.uint16).tobytes()
        ids = b"".join(map(self.cache.__getitem__, segments))
        for segment in new:
            if len(segment) > 100:  # long ones (text without spaces) rarely repeat: keep RAM low
                del self.cache[segment]
        return ids


def _tokenize_to(cache, files, tokenizer, chunk_bytes, progress, column="text"):
    """Write the tokens to a temp file, then rename it: a cache file is always complete."""
    from tqdm import tqdm
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    tmp = cache[: -len(".bin")] + f".{os.getpid()}.tmp.bin"  # still matches .gitignore's pattern
    bar = tqdm(total=sum(os.path.getsize(f) for f in files), unit="B", unit_scale=True,
               desc="tokenizing", disable=not progress, file=sys.stderr)
    encode, n_bytes, first, h = _SegmentEncoder(tokenizer), 0, True, hashlib.blake2b(digest_size=16)
    def put(ids):
        h.update(ids)
        return out.write(ids)
    try:
        with open(tmp, "wb") as out:
            out.write(bytes(CACHE_HEADER.size))  # filled in once the count and checksum are known
            for path in files:
                for document in sources.documents(path, column, chunk_bytes):
                    if not first:  # documents are separated, not terminated, by <|endoftext|>
                        n_bytes += put(np.array([EOT_ID], dtype=np.uint16).tobytes())
                    first = False
                    for n_read, text in document:
                        n_bytes += put(encode(text))
                        bar.update(n_read)
            out.seek(0)
            out.write(CACHE_HEADER.pack(CACHE_MAGIC, n_bytes // 2, h.digest()))
            out.flush()
            os.fsync(out.fileno())
        if n_bytes == 0:
            raise DataError(f"no tokens in {', '.join(files)} (expected some text)")
        os.replace(tmp, cache)
    finally:
        bar.close()
        if os.path.exists(tmp):
            os.remove(tmp)


def dataset_stats(tokens):
    """Counts for the start-of-training diagnostics: tokens, distinct token ids, documents."""
    counts = np.zeros(65536, dtype=np.int64)
    for start in range(0, len(tokens), 1 << 24):  # bincount copies to int64: go in slices
        counts += np.bincount(np.asarray(tokens[start:start + (1 << 24)]), minlength=65536)
    return {"tokens": int(len(tokens)), "unique_tokens": int(np.count_nonzero(counts)),
            "documents": int(counts[EOT_ID]) + 1 if len(tokens) else 0}


def split_train_val(tokens, val_frac):
    """(train, val): the last val_frac of the tokens is the validation set (views, no copy)."""
    if not 0 <= val_frac < 1:
        raise DataError(f"val_frac must be in [0, 1), got {val_frac}")
    n_train = len(tokens) - int(len(tokens) * val_frac)
    return tokens[:n_train], tokens[n_train:]


class DataLoaderLite:
    """Contiguous (B, T) windows; each next_batch() on every rank consumes one global batch of
    B*T*world_size tokens, rank r reading the window at position + r*B*T (then +1 for targets).
    So k ranks x 1 call read the same tokens as 1 rank x k calls (gradient accumulation)."""

    def __init__(self, tokens, batch_size, seq_len, rank=0, world_size=1):
        if batch_size < 1 or seq_len < 1 or not 0 <= rank < world_size:
            raise DataError(f"bad loader shape: batch_size={batch_size}, seq_len={seq_len}, "
                            f"rank={rank}, world_size={world_size}")
        self.tokens, self.B, self.T = tokens, batch_size, seq_len
        self.rank, self.world_size = rank, world_size
        self.global_batch = batch_size * seq_len * world_size  # tokens consumed per call
        need = self.global_batch + 1
        if len(tokens) < need:
            raise DataError(f"need {need} tokens for batch_size {batch_size} x seq_len {seq_len} x "
                            f"{world_size} rank(s) (+1 target), have {len(tokens)}: use more data "
                            "or a smaller batch/sequence")
        self.position, self.epoch = 0, 0

    @property
    def batches_per_epoch(self):
        """Global batches (calls of next_batch) before the loader wraps to the start."""
        return (len(self.tokens) - 1) // self.global_batch

    def next_batch(self):
        if self.position + self.global_batch + 1 > len(self.tokens):
            self.position, self.epoch = 0, self.epoch + 1
        start = self.position + self.rank * self.B * self.T
        window = np.asarray(self.tokens[start:start + self.B * self.T + 1]).astype(np.int64)
        buf = torch.from_numpy(window)  # only this window leaves the memmap
        self.position += self.global_batch
        return buf[:-1].view(self.B, self.T), buf[1:].view(self.B, self.T)

    def state_dict(self):
        return {"position": int(self.position), "epoch": int(self.epoch)}

    def load_state_dict(self, state):
        if "position" not in state:
            raise DataError(f"the checkpoint streamed {state.get('stream')}, not token files: resume "
                            "it with its own --data")
        position = int(state["position"])
        if not 0 <= position <= len(self.tokens):
            raise DataError(f"saved data position {position} is outside these {len(self.tokens)} "
                            "tokens: was the checkpoint trained on other data?")
        self.position, self.epoch = position, int(state["epoch"])
