"""Tokenisation, the second stage of the data: the documents of a --data, through the SmolLM2
tokenizer piece by piece (never the whole corpus in RAM), giving exactly the ids of tokenizer.encode()
on each whole document, into a uint16 token file cached beside the data. Its name holds a hash of the
files' contents, of tokenizer.json and of the text column (fingerprint()), so a second run starts at
once; its header holds a checksum, and a damaged cache is rebuilt. <|endoftext|> (id 0) goes between
documents. Conversations (chat.py) are cached the same way: their ids, loss mask and starts, keyed also by
the chat template. loaders.py and chat_loaders.py serve batches from them.
"""
import contextlib
import hashlib
import os
import struct
import sys

import numpy as np

from smollm2.chat import Conversations, chat_template, check_messages, encode_conversations
from smollm2.documents import CHUNK_BYTES, documents, is_row_file, is_stream, message_rows, resolve_files
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
                problem = None if rest_digest(f) == digest else "the checksum of its ids does not match"
    except OSError as e:
        problem = f"unreadable: {e}"
    return whole("token cache", cache, problem)


def rest_digest(f):
    """The blake2b-128 digest of what is left of file f to read: a cache's checksum."""
    h = hashlib.blake2b(digest_size=16)
    while block := f.read(1 << 24):
        h.update(block)
    return h.digest()


def whole(kind, cache, problem):
    """Whether a cache is whole (problem None); if not, say so, and that it is being rebuilt."""
    if problem:
        print(f"{kind} {cache} is damaged ({problem}): rebuilding it", file=sys.stderr, flush=True)
    return problem is None


@contextlib.contextmanager
def _writing(cache):
    """An open temp file beside cache, renamed to cache (fsynced) when the block ends without an
    error and removed when it does not: a cache file is always complete."""
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    tmp = cache[: -len(".bin")] + f".{os.getpid()}.tmp.bin"  # still matches .gitignore's pattern
    try:
        with open(tmp, "wb") as out:
            yield out
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, cache)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _tokenize_to(cache, files, tokenizer, chunk_bytes, progress, column="text"):
    """Write the tokens of files into the cache (_writing)."""
    from tqdm import tqdm
    bar = tqdm(total=sum(os.path.getsize(f) for f in files), unit="B", unit_scale=True,
               desc="tokenizing", disable=not progress, file=sys.stderr)
    encode, n_bytes, first, h = SegmentEncoder(tokenizer), 0, True, hashlib.blake2b(digest_size=16)
    def put(ids):
        h.update(ids)
        return out.write(ids)
    try:
        with _writing(cache) as out:
            out.write(bytes(CACHE_HEADER.size))  # filled in once the count and checksum are known
            for path in files:
                for document in documents(path, column, chunk_bytes):
                    if not first:  # documents are separated, not terminated, by <|endoftext|>
                        n_bytes += put(np.array([EOT_ID], dtype=np.uint16).tobytes())
                    first = False
                    for n_read, text in document:
                        n_bytes += put(encode(text))
                        bar.update(n_read)
            if n_bytes == 0:
                raise DataError(f"no tokens in {', '.join(files)} (expected some text)")
            out.seek(0)
            out.write(CACHE_HEADER.pack(CACHE_MAGIC, n_bytes // 2, h.digest()))
    finally:
        bar.close()


def dataset_stats(tokens):
    """Counts for the start-of-training diagnostics: tokens, distinct token ids, documents."""
    counts = np.zeros(65536, dtype=np.int64)
    for start in range(0, len(tokens), 1 << 24):  # bincount copies to int64: go in slices
        counts += np.bincount(np.asarray(tokens[start:start + (1 << 24)]), minlength=65536)
    return {"tokens": int(len(tokens)), "unique_tokens": int(np.count_nonzero(counts)),
            "documents": int(counts[EOT_ID]) + 1 if len(tokens) else 0}


# ----------------------------------------------------------------------------- conversations
CONV_MAGIC = b"SMOLCNV1"  # header: magic, tokens, conversations, skipped (no assistant turn), checksum
CONV_HEADER = struct.Struct("<8sQQQ16s")
CONV_BATCH = 1024  # conversations rendered and encoded at a time


def tokenize_conversations(spec, tokenizer_dir=TOKENIZER_DIR, cache_dir=None, progress=True):
    """The Conversations of the files in spec, rendered with the chat template of tokenizer_dir, from
    the cache beside them, tokenising on a miss. The cache's key covers the template too."""
    files = resolve_files(spec)
    tokenizer, template = load_tokenizer(tokenizer_dir), chat_template(tokenizer_dir)
    key = "messages (conversations v1, template " + hashlib.blake2b(template.source.encode(), digest_size=8).hexdigest()
    cache = _cache_path(files, tokenizer_file(tokenizer_dir), cache_dir, key + ")")
    cache = cache[: -len(".bin")] + ".conv.bin"  # still matches TOKEN_CACHE_NAME
    if not os.path.exists(cache) or not _conversations_whole(cache):
        _conversations_to(cache, files, tokenizer, template, progress)
    elif progress:
        print(f"conversations from cache {cache}", file=sys.stderr)
    return _read_conversations(cache)


def _conv_offsets(n_tokens, n_conv):
    """Offsets in a conversation cache file of its tokens, mask and starts, and its size."""
    tok = CONV_HEADER.size
    mask = tok + 2 * n_tokens
    starts = mask + n_tokens + (-(mask + n_tokens)) % 8
    return tok, mask, starts, starts + 8 * (n_conv + 1)


def _read_conversations(cache):
    with open(cache, "rb") as f:
        _, n_tokens, n_conv, skipped, _ = CONV_HEADER.unpack(f.read(CONV_HEADER.size))
    tok, mask, starts, _ = _conv_offsets(n_tokens, n_conv)
    return Conversations(np.memmap(cache, np.uint16, "r", tok, (n_tokens,)),
                         np.memmap(cache, np.uint8, "r", mask, (n_tokens,)),
                         np.array(np.memmap(cache, np.int64, "r", starts, (n_conv + 1,))), skipped)


def _conversations_whole(cache):
    problem = None
    try:
        with open(cache, "rb") as f:
            head = f.read(CONV_HEADER.size)
            if len(head) != CONV_HEADER.size or head[:8] != CONV_MAGIC:
                problem = "no valid header"
            else:
                _, n_tokens, n_conv, _, digest = CONV_HEADER.unpack(head)
                if os.fstat(f.fileno()).st_size != _conv_offsets(n_tokens, n_conv)[3]:
                    problem = "its size does not match its header"
                else:
                    problem = None if rest_digest(f) == digest else "the checksum does not match"
    except OSError as e:
        problem = f"unreadable: {e}"
    return whole("conversation cache", cache, problem)


def _conversations_to(cache, files, tokenizer, template, progress):
    """Render, encode and write every conversation (tokens, then mask, then starts) into the cache
    (_writing)."""
    from tqdm import tqdm
    pieces, skipped = [], 0
    bar = tqdm(unit=" conversations", desc="tokenizing", disable=not progress, file=sys.stderr)

    def flush(batch):
        pieces.extend(encode_conversations(tokenizer, batch, template))
        bar.update(len(batch))
    try:
        batch = []
        for path in files:
            for where, messages in message_rows(path):
                turns = check_messages(messages, where)
                if not any(role == "assistant" for role, _ in turns):
                    skipped += 1  # nothing to learn from: counted, said in the log
                    continue
                batch.append(turns)
                if len(batch) == CONV_BATCH:
                    flush(batch)
                    batch = []
        flush(batch)
        if not pieces:
            raise DataError(f"no conversation in {', '.join(files)} has an assistant turn "
                            f"({skipped:,} skipped): nothing carries the loss")
        conv = Conversations.join(pieces)
        tok, mask_at, starts_at, size = _conv_offsets(len(conv), conv.count)
        body = bytearray(size - CONV_HEADER.size)
        body[:2 * len(conv)] = conv.tokens.tobytes()
        body[mask_at - tok:mask_at - tok + len(conv)] = conv.mask.tobytes()
        body[starts_at - tok:] = conv.starts.tobytes()
        digest = hashlib.blake2b(bytes(body), digest_size=16).digest()
        with _writing(cache) as out:
            out.write(CONV_HEADER.pack(CONV_MAGIC, len(conv), conv.count, skipped, digest))
            out.write(body)
    finally:
        bar.close()
