"""Benchmark: streaming tokenize_corpus() against one tokenizer.encode() of the whole text.

Builds a ~100 MB corpus from input.txt (shuffled paragraphs and changed case per copy, so it is not
one text repeated), then runs each measurement in its own process, so one's memory cannot show in
another's peak RSS. Whole-text encoding is slow and memory-hungry at 100 MB, so it runs on a prefix
(--whole-mb); its MB/s only flatters it, as it gets slower per MB the longer the text. The same
corpus as one parquet file of documents of about 4 kB (rows, in row groups of 1,000) measures the
parquet path (pyarrow needed), its MB being those of its text, not of the compressed file.

    python -m bench.tokenizing [--corpus-mb 100] [--whole-mb 16] [--json]
"""
import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # smollm2/


def build_corpus(directory, total_mb, n_files=10):
    """n_files text files of about total_mb MB in all, each a run of varied copies of input.txt."""
    with open(os.path.join(ROOT, "input.txt"), encoding="utf-8") as f:
        paragraphs = f.read().split("\n\n")
    rng, copy = random.Random(0), 0
    per_file = total_mb * 1e6 / n_files
    for i in range(n_files):
        with open(os.path.join(directory, f"part{i:02d}.txt"), "w", encoding="utf-8") as f:
            while (room := int(per_file) - f.tell()) > 0:
                rng.shuffle(paragraphs)
                words = "\n\n".join(paragraphs).split(" ")
                words[copy % 7::7] = [w.upper() for w in words[copy % 7::7]]
                f.write((" ".join(words) + "\n\n")[:room])  # input.txt is ASCII: chars = bytes
                copy += 1


def build_parquet(corpus, path, doc_bytes=4000, group_rows=1000):
    """The corpus's text as one parquet file of ~doc_bytes documents; returns the text's bytes."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    schema, rows, n_bytes = pa.schema([("text", pa.string())]), [], 0
    with pq.ParquetWriter(path, schema) as writer:
        for name in sorted(os.listdir(corpus)):
            with open(os.path.join(corpus, name), encoding="utf-8") as f:
                text = f.read()
            for start in range(0, len(text), doc_bytes):  # ASCII: chars = bytes
                rows.append(text[start:start + doc_bytes])
                n_bytes += len(rows[-1])
                if len(rows) == group_rows:
                    writer.write_table(pa.table({"text": rows}, schema=schema))
                    rows = []
        if rows:
            writer.write_table(pa.table({"text": rows}, schema=schema))
    return n_bytes


def _cpu_seconds():
    usage = resource.getrusage(resource.RUSAGE_SELF)  # all threads of this process
    return usage.ru_utime + usage.ru_stime


def child(mode, path):
    """One measurement in this (fresh) process; prints a JSON line."""
    from smollm2.documents import resolve_files
    from smollm2.token_cache import tokenize_corpus
    from smollm2.tokenizer import load_tokenizer
    rss_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    n_bytes = sum(os.path.getsize(f) for f in resolve_files(path))
    t0, cpu0 = time.perf_counter(), _cpu_seconds()
    if mode == "whole":
        with open(path, encoding="utf-8") as f:
            n_tokens = len(load_tokenizer().encode(f.read()).ids)
    else:
        with tempfile.TemporaryDirectory() as cache:  # always a cache miss
            n_tokens = len(tokenize_corpus(path, cache_dir=cache, progress=False))
    seconds, cpu = time.perf_counter() - t0, _cpu_seconds() - cpu0
    print(json.dumps({"bytes": n_bytes, "tokens": n_tokens, "seconds": seconds, "cpu_seconds": cpu,
                      "rss_after_imports_mb": rss_start / 1024,  # ru_maxrss is in KiB on Linux
                      "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def measure(mode, path, single_thread=False, text_bytes=None):
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false" if single_thread else "true")
    out = subprocess.run([sys.executable, __file__, "--child", mode, path], env=env,
                         capture_output=True, text=True, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    result["bytes"] = text_bytes or result["bytes"]  # parquet: its text, not its compressed size
    result["mb_per_s"] = result["bytes"] / 1e6 / result["seconds"]
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus-mb", type=int, default=100)
    parser.add_argument("--whole-mb", type=int, default=16, help="prefix for whole-text encode")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child)

    with tempfile.TemporaryDirectory() as tmp:
        corpus = os.path.join(tmp, "corpus")
        os.mkdir(corpus)
        build_corpus(corpus, args.corpus_mb)
        prefix = os.path.join(tmp, "prefix.txt")
        text = b""
        for name in sorted(os.listdir(corpus)):
            with open(os.path.join(corpus, name), "rb") as f:
                text += f.read(args.whole_mb * 1_000_000 - len(text))
        with open(prefix, "wb") as f:  # cut at a newline, never inside a UTF-8 character
            f.write(text[: text.rfind(b"\n") + 1])
        runs = {
            "whole-text encode (prefix)": measure("whole", prefix),
            "tokenize_corpus, 1 thread (prefix)": measure("stream", prefix, single_thread=True),
            f"tokenize_corpus, {os.cpu_count()} cores (corpus)": measure("stream", corpus),
        }
        parquet = os.path.join(tmp, "corpus.parquet")
        text_bytes = build_parquet(corpus, parquet)
        runs[f"tokenize_corpus, {os.cpu_count()} cores (parquet)"] = measure(
            "stream", parquet, text_bytes=text_bytes)
    names = list(runs)  # whole, 1 thread, text corpus, parquet
    whole, streamed, parquet = runs[names[0]], runs[names[2]], runs[names[3]]
    cpu_rate = {name: r["bytes"] / r["cpu_seconds"] for name, r in runs.items()}
    summary = {"cpu_count": os.cpu_count(), "speedup": streamed["mb_per_s"] / whole["mb_per_s"],
               "cpu_speedup": cpu_rate[names[2]] / cpu_rate[names[0]], "runs": runs,
               "parquet_vs_text": parquet["mb_per_s"] / streamed["mb_per_s"], "load_average": os.getloadavg()[0]}
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    print(f"{'run':<38} {'MB':>6} {'tokens':>11} {'wall s':>7} {'MB/s':>6} {'cpu s':>7} "
          f"{'MB/cpu-s':>8} {'peak RSS MB':>11} {'(imports)':>9}")
    for name, r in runs.items():
        print(f"{name:<38} {r['bytes'] / 1e6:6.1f} {r['tokens']:11,d} {r['seconds']:7.1f} "
              f"{r['mb_per_s']:6.2f} {r['cpu_seconds']:7.1f} "
              f"{r['bytes'] / 1e6 / r['cpu_seconds']:8.2f} {r['peak_rss_mb']:11.0f} "
              f"{r['rss_after_imports_mb']:9.0f}")
    print(f"streaming speed-up over whole-text encode: {summary['speedup']:.1f}x wall-clock "
          f"(target >= 4x), {summary['cpu_speedup']:.1f}x per CPU-second; "
          f"streaming peak RSS {streamed['peak_rss_mb']:.0f} MB (target < 1024)")
    print(f"parquet: {parquet['mb_per_s']:.2f} MB/s of text, {parquet['mb_per_s'] / streamed['mb_per_s']:.2f}x "
          f"the text files' (target >= 1x); peak RSS {parquet['peak_rss_mb']:.0f} MB (target < 1024)")
    print(f"load average at the end: {summary['load_average']:.1f} on {os.cpu_count()} cores "
          "(other processes on the machine slow the wall-clock figures, not the CPU ones)")


if __name__ == "__main__":
    main()
