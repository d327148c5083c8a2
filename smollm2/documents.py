"""Documents, the first stage of the data: which files a --data names, and each file read as a run
of documents. A text file is one document; each row of a .parquet file (read one row group at a time
with pyarrow) or line of a .jsonl / .jsonl.gz file is one, its text in the --text-column.
hf:NAME[:CONFIG] (or hf:./folder of parquet/JSONL shards) is a stream of documents opened with
`datasets` (open_stream); loaders.StreamLoader tokenises it on the fly, never cached nor downloaded whole.
Rows with a `messages` column are conversations (chat.py): data_kind tells which kind a --data holds.
"""
import atexit
import codecs
import gzip
import glob
import json
import os
import re
import weakref

from smollm2.chat import COLUMN, is_conversation_example, is_conversation_row
from smollm2.errors import DataError, reason
from smollm2.tokenizer import SAFE_CUT

ROW_SUFFIXES = (".parquet", ".jsonl", ".jsonl.gz")  # files whose rows (lines) are the documents
ROW_GROUP_SLICE = 4096  # rows turned into Python strings at a time
CHUNK_BYTES = 1 << 20  # text read and encoded at a time
TOKEN_CACHE_NAME = re.compile(r".*\.tokens\..*\.bin$")  # token_cache's files (and .gitignore's pattern): no data
KIND_NAMES = {"text": "text", "conversations": f"conversations (a {COLUMN!r} column)"}  # data_kind: how it is said


def is_stream(spec):
    return str(spec).startswith("hf:")


def is_row_file(path):
    return path.endswith(ROW_SUFFIXES)


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
                   if os.path.isfile(f) and not TOKEN_CACHE_NAME.match(os.path.basename(f)))
    if not files:
        raise DataError(f"no data files in {spec} (expected text, .parquet or .jsonl[.gz] files)")
    return files


def documents(path, column="text", chunk_bytes=None):
    """Yield each document of the file as an iterable of (bytes of the file read, text piece)."""
    chunk_bytes = chunk_bytes or CHUNK_BYTES
    if path.endswith(".parquet"):
        yield from _parquet_documents(path, column)
    elif path.endswith((".jsonl", ".jsonl.gz")):
        yield from _jsonl_documents(path, column)
    else:
        yield text_pieces(path, chunk_bytes)


# ----------------------------------------------------------------------------- text files
def text_pieces(path, chunk_bytes):
    """Yield (bytes read since the last piece, text) with pieces of about chunk_bytes, cut only
    at safe places (SAFE_CUT). Raises DataError at the first NUL byte or invalid UTF-8. Text
    without a safe cut (no space or newline between words) stays one piece: slow, but still exact."""
    offset, pending, carry, n_read = 0, b"", "", 0  # offset: where pending starts in the file
    with open(path, "rb") as f:
        while True:
            block = f.read(max(chunk_bytes, len(carry)))  # no cut yet: read more each time
            n_read += len(block)
            raw, final = pending + block, not block
            text, consumed = _decode(raw, final, path, offset)
            text = carry + text
            offset, pending = offset + consumed, raw[consumed:]  # pending: half a character
            if final:  # end of file: what is left is the last piece
                cut = len(text)
            else:  # look in the second half for a cut, and never rescan a long carry
                m = SAFE_CUT.search(text, max(len(text) // 2, len(carry) - 2))
                cut = m.start() if m else 0
            carry = text[cut:]
            if cut:
                yield n_read, text[:cut]
                n_read = 0
            if final:
                return


def _decode(raw, final, path, offset):
    """(text, bytes consumed): UTF-8 text, leaving a character cut off at the end unless final."""
    nul = raw.find(b"\0")
    if nul >= 0:
        raise DataError(f"{path} looks binary (NUL byte at offset {offset + nul}); "
                        "expected UTF-8 text")
    try:
        return codecs.utf_8_decode(raw, "strict", final)
    except UnicodeDecodeError as e:
        where = offset + e.start
        raise DataError(f"{path} is not UTF-8 text (bad byte at offset {where})") from None


# ----------------------------------------------------------------------------- row files
def row_text(row, column, where):
    """The document text of one row (a JSONL object or a hub example), or a DataError saying where."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object with a {column!r} field, "
                        f"got {type(row).__name__}")
    if column not in row:
        raise DataError(f"{where}: no {column!r} field (it has: {', '.join(row) or 'none'}); "
                        "name the text field with --text-column")
    text = row[column]
    if not isinstance(text, str):
        raise DataError(f"{where}: {column!r} is {type(text).__name__}, expected a string")
    return text


def _parquet_documents(path, column):
    file = _parquet_file(path)
    import pyarrow as pa  # importable: _parquet_file checked
    schema = file.schema_arrow
    if column not in schema.names:
        raise DataError(f"{path} has no column {column!r} (its columns: {', '.join(schema.names)}); "
                        "name the text column with --text-column")
    kind = schema.field(column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)
            or getattr(pa.types, "is_string_view", lambda _: False)(kind)):
        raise DataError(f"{path}: column {column!r} holds {kind}, expected strings")
    size, groups, row = os.path.getsize(path), file.num_row_groups, 0
    for g in range(groups):  # one row group of one column in RAM at a time
        texts = file.read_row_group(g, columns=[column]).column(0)
        share = size * (g + 1) // groups - size * g // groups  # progress: bytes of this group
        for start in range(0, len(texts), ROW_GROUP_SLICE):
            for text in texts.slice(start, ROW_GROUP_SLICE).to_pylist():
                if text is None:
                    raise DataError(f"{path} row {row}: {column!r} is null, expected a string")
                yield ((share, text),)
                share, row = 0, row + 1
        del texts


def _jsonl_documents(path, column):
    done = 0
    for where, row, at in _jsonl_rows(path):
        text = row_text(row, column, where)
        yield ((at - done, text),)  # progress: the file's bytes read for this row
        done = at


# ----------------------------------------------------------------------------- conversations
def data_kind(spec, column="text", dataset=None):
    """"conversations" or "text" (KIND_NAMES): files by their rows (file_kind), a one-line DataError for a
    mix (train on one kind at a time); a stream (its open dataset if given) by its first example."""
    if is_stream(spec):
        dataset = dataset if dataset is not None else open_stream(spec)
        it = iter(dataset)
        OPEN_ITERATORS.add(it)
        example = next_example(it, spec)
        it.close()
        return "conversations" if is_conversation_example(example, column) else "text"
    files = resolve_files(spec)
    kinds = {f: file_kind(f, column) for f in files}
    if len(set(kinds.values())) > 1:
        chat = [f for f, k in kinds.items() if k == "conversations"]
        text = [f for f, k in kinds.items() if k == "text"]
        raise DataError(f"{spec} mixes conversation files ({os.path.basename(chat[0])}: a 'messages' "
                        f"column) with text files ({os.path.basename(text[0])}); train on one kind at a time")
    return kinds[files[0]]


def file_kind(path, column="text"):
    """"conversations" when the file's rows hold a `messages` field (a parquet column, the first
    JSONL row's field) and no `column`; else "text" (text files always)."""
    if path.endswith(".parquet"):
        names = _parquet_file(path).schema_arrow.names
        return "conversations" if COLUMN in names and column not in names else "text"
    if path.endswith((".jsonl", ".jsonl.gz")):
        for where, row, _ in _jsonl_rows(path):
            return "conversations" if is_conversation_row(row, column) else "text"
    return "text"


def message_rows(path):
    """Yield (where, the row's `messages` value) for every row of a parquet or JSONL file."""
    if path.endswith(".parquet"):
        file, row = _parquet_file(path), 0
        for g in range(file.num_row_groups):
            values = file.read_row_group(g, columns=["messages"]).column(0)
            for start in range(0, len(values), ROW_GROUP_SLICE):
                for messages in values.slice(start, ROW_GROUP_SLICE).to_pylist():
                    yield f"{path} row {row}", messages
                    row += 1
        return
    for where, row, _ in _jsonl_rows(path):
        if not isinstance(row, dict) or "messages" not in row:
            got = f"fields: {', '.join(row) or 'none'}" if isinstance(row, dict) else type(row).__name__
            raise DataError(f"{where}: no 'messages' field ({got}); a conversation file has one on every row")
        yield where, row["messages"]


def _parquet_file(path):
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as e:
        raise DataError(f"{path} is not a readable parquet file ({str(e)[:120]})") from None


def _jsonl_rows(path):
    """Yield (where, parsed row, the file's bytes read so far) of each non-blank line of a JSONL
    file (.gz too); a line that is not UTF-8 JSON, or an unreadable file, is a one-line DataError."""
    with open(path, "rb") as raw:
        lines = gzip.GzipFile(fileobj=raw) if path.endswith(".gz") else raw
        lineno = 0
        try:
            for lineno, line in enumerate(lines, 1):
                if not line.strip():  # blank lines (a trailing one, say) hold no row
                    continue
                where = f"{path} line {lineno}"
                try:
                    row = json.loads(line)
                except UnicodeDecodeError:
                    raise DataError(f"{where}: not UTF-8") from None
                except ValueError as e:
                    raise DataError(f"{where}: not JSON ({getattr(e, 'msg', e)})") from None
                yield where, row, raw.tell()
        except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
            raise DataError(f"{path} line {lineno + 1}: unreadable ({e})") from None


# ----------------------------------------------------------------------------- hub streams
OPEN_ITERATORS = weakref.WeakSet()


@atexit.register
def _close_iterators():
    """Close live dataset iterators while the interpreter is whole: left to its teardown,
    datasets' parquet generator prints an ignored AttributeError on stderr."""
    for it in list(OPEN_ITERATORS):
        it.close()


def open_stream(spec):
    """The IterableDataset of hf:NAME[:CONFIG] (its train split), or a one-line DataError."""
    name, _, config = spec[len("hf:"):].partition(":")
    if not name:
        raise DataError(f"{spec}: expected hf:NAME[:CONFIG], e.g. hf:HuggingFaceTB/"
                        "smollm-corpus:cosmopedia-v2, or hf:./folder of parquet/JSONL shards")
    local = name.startswith((".", "/", "~"))
    if local and not os.path.isdir(os.path.expanduser(name)):
        raise DataError(f"{spec}: no such directory {name}")
    try:
        import datasets
    except ImportError:
        raise DataError(f"{spec}: hf: sources need the datasets package "
                        "(pip install datasets)") from None
    from datasets.data_files import EmptyDatasetError
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its errors reach us as exceptions,
    try:  # which we report in one line: its log lines would only repeat them on stderr
        if local:  # only the shards: a token cache or a README beside them is no data
            return _load_local(datasets, os.path.expanduser(name), spec)
        return datasets.load_dataset(name, config or None, split="train", streaming=True)
    except DataError:
        raise
    except (EmptyDatasetError, StopIteration) as e:  # no data files; files of no rows
        raise DataError(f"{spec}: the stream is empty ({reason(e)})") from None
    except Exception as e:  # the library raises many kinds (hub, config, file errors): say which
        raise DataError(f"{spec}: cannot stream it ({reason(e)})") from None


def _load_local(datasets, folder, spec):
    """A local folder's parquet or JSONL shards (sorted, any depth) through the same streaming path
    as a hub dataset, with nothing else in the folder taken for data."""
    shards = sorted(os.path.join(root, n) for root, _, names in os.walk(folder) for n in names
                    if is_row_file(n) and not n.startswith("."))
    kinds = {"parquet" if f.endswith(".parquet") else "json" for f in shards}
    if len(kinds) > 1:
        raise DataError(f"{spec}: mixes parquet and JSONL shards; keep one kind per folder")
    if not shards:
        raise DataError(f"{spec}: the stream is empty (no .parquet, .jsonl or .jsonl.gz files in it)")
    return datasets.load_dataset(kinds.pop(), data_files={"train": shards}, split="train", streaming=True)


def next_example(iterator, spec):
    """The stream's next example, None at its end, or a one-line DataError."""
    try:
        return next(iterator, None)
    except Exception as e:
        raise DataError(f"{spec}: reading the stream failed ({reason(e)})") from None
