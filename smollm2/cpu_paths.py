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


ISA_LIMITS = ("ATEN_CPU_CAPABILITY", "DNNL_MAX_CPU_ISA", "ONEDNN_MAX_CPU_ISA", "MKL_ENABLE_INSTRUCTIONS")


def machine_key(info=None, environ=None):
    """This machine as the choice depends on it: CPU model, a digest of its feature flags, torch, and
    the variables that hold torch's, oneDNN's or MKL's kernels to an older instruction set (an
    AVX-512 CPU with them set to AVX2 runs as an AVX2 one, and is measured as one)."""
    name, _, flags = info or cpu_info()
    environ = os.environ if environ is None else environ
    digest = hashlib.sha256(" ".join(sorted(flags)).encode()).hexdigest()[:12]
    limits = "".join(f" | {k}={environ[k]}" for k in ISA_LIMITS if environ.get(k))
    return f"{name or platform.machine()} | flags {digest} | torch {torch.__version__}{limits}"


def onednn_available():
    return torch.backends.mkldnn.is_available() and platform.machine().lower() in ("x86_64", "amd64")


def weight_shapes(config):
    """(N, K) of the decoder's weights: q/o, k/v, gate/up, down."""
    C, I, kv = config.hidden_size, config.intermediate_size, config.num_key_value_heads * config.head_dim
    return sorted({(C, C), (kv, C), (I, C), (C, I)})


MEASURED_ROWS = 512  # rows of the timed products at most: a training step's shapes, in a fraction of a second


def measure(config, rows=MEASURED_ROWS, reps=2):
    """{"mkl": FLOP/s, "onednn": FLOP/s} of the decoder's linear layers in training on this CPU: the
    forward product and both gradients of each weight shape, as a training step runs them (MKL:
    F.linear; oneDNN: speedups.OneDNNLinear, its transposed copies included). Each the fastest of reps
    runs on one thread (times the threads torch uses: a busy core delays a team of several), the two
    libraries taking turns, so that a busy machine slows both alike."""
    from smollm2 import speedups
    rows = min(rows, MEASURED_ROWS)
    layers = [(torch.randn(rows, k, requires_grad=True), torch.randn(n, k, requires_grad=True), torch.randn(rows, n))
              for n, k in weight_shapes(config)]
    libraries = {"mkl": torch.nn.functional.linear, "onednn": speedups.OneDNNLinear.apply}
    fastest = {(name, i): float("inf") for name in libraries for i in range(len(layers))}
    threads, routed = torch.get_num_threads(), speedups.ONEDNN
    torch.set_num_threads(1)
    speedups.ONEDNN = True  # OneDNNLinear's products through oneDNN while timed
    try:
        for rep in range(reps + 1):  # the first round sets the kernels up
            for i, (x, w, grad) in enumerate(layers):
                for name, linear in libraries.items():
                    t0 = time.perf_counter()
                    torch.autograd.grad(linear(x, w), (x, w), grad)
                    if rep:
                        fastest[name, i] = min(fastest[name, i], time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
        speedups.ONEDNN = routed
    flops = sum(6 * rows * w.size(0) * w.size(1) for _, w, _ in layers) * threads
    return {name: flops / sum(fastest[name, i] for i in range(len(layers))) for name in libraries}


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
    rows = min(rows, MEASURED_ROWS)
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
