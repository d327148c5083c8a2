"""The CPU path that fp32 training speed depends on most, chosen by measuring it on the CPU at hand,
not by vendor: the library of the training products, MKL (torch's own) or oneDNN (through
speedups.RoutedLinear). A rule by vendor broke on the third CPU it met: AMD's Zen 4/5 (AVX-512) run
oneDNN at twice MKL's speed (445-490 against 195-231 GFLOP/s), AMD's Zen 3 (AVX2 only) runs MKL faster
(184 against 140), Intel's Xeons run MKL faster.

The measurement is short (well under a second: the model's own products, forward and backward
shapes, each library, the fastest of a few runs), cached per machine (CPU model, feature flags, torch
version: ~/.cache/smollm2/cpu_paths.json, or $SMOL_CACHE_DIR), printed in the start-up log with its
figures, and stored in the checkpoint: a resume on the same machine takes the path the run took (a
bit-exact resume), a resume on another machine measures again and says what changed.
"""
import contextlib
import hashlib
import json
import os
import platform
import time

import torch

from smollm2.devices import cpu_info

ONEDNN_MARGIN = 1.10  # oneDNN must be this much faster: MKL is torch's own path, and a timing is noisy


def cache_path():
    root = os.environ.get("SMOL_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "smollm2")
    return os.path.join(root, "cpu_paths.json")


def machine_key(info=None):
    """This machine as the choice depends on it: CPU model, a digest of its feature flags, torch."""
    name, _, flags = info or cpu_info()
    digest = hashlib.sha256(" ".join(sorted(flags)).encode()).hexdigest()[:12]
    return f"{name or platform.machine()} | flags {digest} | torch {torch.__version__}"


def onednn_available():
    return torch.backends.mkldnn.is_available() and platform.machine().lower() in ("x86_64", "amd64")


def product_shapes(config, rows):
    """(M, N, K) of the decoder's fp32 training products: each weight (N, K) forward (rows, K) x (K, N),
    and backward for the input's gradient (rows, N) x (N, K) and the weight's (N, rows) x (rows, K)."""
    C, I, kv = config.hidden_size, config.intermediate_size, config.num_key_value_heads * config.head_dim
    weights = {(C, C), (kv, C), (I, C), (C, I)}  # q/o, k/v, gate/up, down
    return sorted({s for n, k in weights for s in ((rows, n, k), (rows, k, n), (n, k, rows))})


def measure(config, rows=1024, reps=2):
    """{"mkl": FLOP/s, "onednn": FLOP/s} of the training products of config on this CPU, each the
    fastest of reps runs (a busy machine slows some runs, rarely all)."""
    from smollm2.speedups import onednn_matmul_nt
    shapes = product_shapes(config, rows)
    pairs = [(torch.randn(m, k), torch.randn(n, k)) for m, n, k in shapes]
    flops = sum(2 * m * n * k for m, n, k in shapes)
    libraries = {"mkl": lambda a, b: a @ b.t(), "onednn": onednn_matmul_nt}
    out = {}
    for name, product in libraries.items():
        total = 0.0
        for a, b in pairs:
            product(a, b)  # the first call sets the kernel up
            fastest = float("inf")
            for _ in range(reps):
                t0 = time.perf_counter()
                product(a, b)
                fastest = min(fastest, time.perf_counter() - t0)
            total += fastest
        out[name] = flops / total
    return out


def pick(figures, margin=ONEDNN_MARGIN):
    """"onednn" where it measured at least `margin` times MKL's rate, else "mkl"."""
    return "onednn" if figures["onednn"] >= margin * figures["mkl"] else "mkl"


def read_cache(path):
    with contextlib.suppress(OSError, ValueError):
        with open(path) as f:
            return json.load(f)
    return {}


def write_cache(path, key, figures):
    """Add this machine's figures to the cache file, atomically; a cache that cannot be written is
    no error (the next run measures again)."""
    with contextlib.suppress(OSError):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        cache = {**read_cache(path), key: figures}
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w") as f:
            json.dump(cache, f, indent=1)
        os.replace(tmp, path)


def choose(config, rows, saved=None, path=None, measure_fn=measure, key=None):
    """The GEMM library of an fp32 CPU training run: a dict {"machine", "route", "figures", "source",
    "note"} (the checkpoint keeps all but the note). saved: the checkpoint's record of the run this
    one resumes. source: "checkpoint" (this machine ran it: the same path), "cache" or "measured"."""
    key, path = key or machine_key(), path or cache_path()
    if saved and saved.get("machine") == key:
        return {**saved, "source": "checkpoint", "note": None}
    shape = (f"{key} | hidden {config.hidden_size}, mlp {config.intermediate_size}, "
             f"kv {config.num_key_value_heads * config.head_dim}, rows {rows}")  # the figures' own key
    figures = read_cache(path).get(shape)
    source = "cache"
    if not figures:
        figures, source = measure_fn(config, rows), "measured"
        write_cache(path, shape, figures)
    route = pick(figures)
    note = None
    if saved and saved.get("machine"):
        note = (f"resumed on another machine ({key}; the run began on {saved['machine']}): fp32 products "
                f"through {route}" + (f", {saved['route']} before" if saved.get("route") != route else ", as before"))
    return {"machine": key, "route": route, "figures": figures, "source": source, "note": note}


def describe(choice):
    """The start-up log's line for a choice."""
    f = choice["figures"]
    how = {"checkpoint": "as the checkpoint's run on this machine", "cache": "measured earlier on this machine",
           "measured": "measured now"}[choice["source"]]
    line = (f"fp32 products: {'oneDNN' if choice['route'] == 'onednn' else 'MKL'} (this model's products: "
            f"MKL {f['mkl'] / 1e9:.3g}, oneDNN {f['onednn'] / 1e9:.3g} GFLOP/s, {how})")
    return line + (f"; {choice['note']}" if choice["note"] else "")


def for_run(config, rows, dtype, proc, saved=None):
    """train.py's choice: None where there is nothing to choose (not fp32 training on an x86 CPU with
    oneDNN); else choose()'s, agreed by every rank (oneDNN only where each measured it faster: the
    ranks of one run compute alike)."""
    if proc.type != "cpu" or dtype != "fp32" or not onednn_available():
        return None
    choice = choose(config, rows, saved)
    if proc.world > 1 and proc.any_rank(choice["route"] != "onednn"):
        choice["route"] = "mkl"
    return choice


def record(choice):
    """What a checkpoint keeps of a choice: the machine, the library, the figures."""
    return None if choice is None else {k: choice[k] for k in ("machine", "route", "figures")}
