"""Tokenisation, the second stage of the data: the documents of a --data, through the SmolLM2
tokenizer piece by piece (never the whole corpus in RAM), giving exactly the ids of tokenizer.encode()
on each whole document, into a uint16 token file cached beside the data. Its name holds a hash of the
files' contents, of tokenizer.json and of the text column (fingerprint()), so a second run starts at
once; its header holds a checksum, and a damaged cache is rebuilt. <|endoftext|> (id 0) goes between
documents. loaders.py serves batches from the tokens.
"""
import hashlib
import os
import struct
import sys

import numpy as np

from smollm2.documents import CHUNK_BYTES, documents, is_row_file, is_stream, resolve_files
from smollm2.errors import DataError
from smollm2.tokenizer import EOT_ID, TOKENIZER_DIR, SegmentEncoder, load_tokenizer, tokenizer_file

CACHE_FORMAT = b"smollm2-tokens-v2: header, uint16, EOT between files"  # bump if the layout changes
# A cache file starts with its magic, its token count and a blake2b of the ids' bytes, checked at
# every load (reading it back costs next to nothing beside tokenising): a damaged one is rebuilt.
CACHE_HEADER = struct.Struct("<8sQ16s")
CACHE_MAGIC = b"SMOLTOK2"
def _file_digest(path, h):
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)


def fingerprint(spec, tokenizer_dir=TOKENIZER_DIR, column="text"):
    """The data's identity, the token cache's key: a hex blake2b over CACHE_FORMAT, tokenizer.json,
    every file's size and bytes and (for parquet/JSONL) the text column. Checkpoints record it to
    tell when the data has changed. A hub stream (hf:...) has no files to hash: its name is its identity."""
    if is_stream(spec):
        return f"{spec} (column {column})"
    return _digest(resolve_files(spec), tokenizer_file(tokenizer_dir), column)


_DIGESTS = {}  # (files, their stats, column) -> digest: the cache and the checkpoint hash a corpus once


def _digest(files, tok_file, column="text"):
    rows = any(map(is_row_file, files))  # text-only corpora keep the keys they had
    stats = (rows and column,) + tuple((f, s.st_size, s.st_mtime_ns, s.st_ino)
                                        for f in (tok_file, *files) for s in [os.stat(f)])
    if stats not in _DIGESTS:
        h = hashlib.blake2b(CACHE_FORMAT, digest_size=8)
        _file_digest(tok_file, h)
        if rows:
            h.update(b"column:" + column.encode())
        for f in files:
            h.update(os.path.getsize(f).to_bytes(8, "little"))
            _file_digest(f, h)
        _DIGESTS[stats] = h.hexdigest()
    return _DIGESTS[stats]


def _cache_path(files, tok_file, cache_dir, column="text"):
    """<name>.tokens.<hash>.bin, the hash over the tokenizer, every file's size and bytes, and the
    text column where a file has rows."""
    digest = _digest(files, tok_file, column)
    name = os.path.basename(files[0]) if len(files) == 1 else "corpus"
    if cache_dir is None:
        cache_dir = os.path.commonpath([os.path.dirname(os.path.abspath(f)) for f in files])
        if not os.access(cache_dir, os.W_OK):  # read-only data: cache in the user's home instead
            cache_dir = os.path.join(os.path.expanduser("~"), ".cache", "smollm2_tokens")
    return os.path.join(cache_dir, f"{name}.tokens.{digest}.bin")


def tokenize_corpus(spec, tokenizer_dir=TOKENIZER_DIR, cache_dir=None, progress=True,
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
    cache = _cache_path(files, tokenizer_file(tokenizer_dir), cache_dir, text_column)
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


def _tokenize_to(cache, files, tokenizer, chunk_bytes, progress, column="text"):
    """Write the tokens to a temp file, then rename it: a cache file is always complete."""
    from tqdm import tqdm
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    tmp = cache[: -len(".bin")] + f".{os.getpid()}.tmp.bin"  # still matches .gitignore's pattern
    bar = tqdm(total=sum(os.path.getsize(f) for f in files), unit="B", unit_scale=True,
               desc="tokenizing", disable=not progress, file=sys.stderr)
    encode, n_bytes, first, h = SegmentEncoder(tokenizer), 0, True, hashlib.blake2b(digest_size=16)
    def put(ids):
        h.update(ids)
        return out.write(ids)
    try:
        with open(tmp, "wb") as out:
            out.write(bytes(CACHE_HEADER.size))  # filled in once the count and checksum are known
            for path in files:
                for document in documents(path, column, chunk_bytes):
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
