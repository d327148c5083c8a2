"""Each speed-up of smollm2/speedups.py and smollm2/engine.py on against off, the same work in one run:
the 135M model (random weights), training steps at B=4, T=256 with AdamW, greedy decoding of one
sequence. docs/performance.md keeps what it printed, per CPU.

    python -m bench.accelerations            # every pair: about 10 minutes on 2 cores
    python -m bench.accelerations --only copy,route --model tiny   # a quick check of the script
"""
import argparse
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from model import PRESETS, SmolLM2  # noqa: E402
from smollm2 import engine, speedups  # noqa: E402
from smollm2.chunked_loss import ChunkedLoss  # noqa: E402


MODEL = "smollm2-135m"  # --model


def step_seconds(dtype, compiled, install, weight_copy=False, steps=4, gemm="mkl"):
    """Median seconds of a training step as train.py takes it (the chunked loss, fused AdamW)."""
    torch.manual_seed(0)
    model = SmolLM2(PRESETS[MODEL]).train()
    if install:
        speedups.install(model, "cpu", dtype, compiled, training=True, keep_memory=False, gemm=gemm)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    fn = ChunkedLoss(model)
    fn = torch.compile(fn) if compiled else fn
    autocast = torch.autocast("cpu", torch.bfloat16, enabled=dtype == "bf16")
    if weight_copy:
        fn, autocast = speedups.LowPrecisionWeights(fn, optimizer), torch.autocast("cpu", enabled=False)
    idx = torch.randint(0, 49152, (4, 257))
    times = []
    for i in range(steps + 2):  # two warm-up steps (compilation)
        t0 = time.perf_counter()
        with autocast:
            loss = fn(idx[:, :-1], idx[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[2:])


def decode_tokens_per_s(kernels=True, options=True, n=96):
    """Tokens/s of compiled greedy decoding with the engine's CPU decode kernel (the streaming linear
    layers) or without it (model.py's modules compiled as they are), with its Inductor options and
    Dynamo's dict tags or without them."""
    torch.manual_seed(0)
    model = SmolLM2(PRESETS[MODEL]).eval()
    install, cpu_options, dict_tags = engine.install_decode_kernels, engine.CPU_OPTIONS, engine.DICT_TAGS
    if not kernels:
        engine.install_decode_kernels = lambda model: 0
    if not options:
        engine.CPU_OPTIONS, engine.DICT_TAGS = {}, False
    try:
        ids = list(range(1, 33))
        engine.generate(model, ids, 8, compile=True)  # the one-off compilation
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            engine.generate(model, ids, n, compile=True)
            times.append(n / (time.perf_counter() - t0))
    finally:
        engine.install_decode_kernels, engine.CPU_OPTIONS, engine.DICT_TAGS = install, cpu_options, dict_tags
    return statistics.median(times)


PAIRS = {  # name: (what, on, off); the figure is seconds a step (lower is better) or tokens/s
    "copy": ("bf16 weight copy, eager bf16 step (s)", lambda: step_seconds("bf16", False, True, weight_copy=True),
             lambda: step_seconds("bf16", False, True)),
    "route": ("oneDNN GEMM route forced on, eager fp32 step (s)", lambda: route_step(True), lambda: route_step(False)),
    "attention": ("attention backward as batched products, compiled bf16 step (s)",
                  lambda: step_seconds("bf16", True, True), lambda: step_seconds("bf16", True, False)),
    "malloc": ("glibc keeps freed memory, eager fp32 step (s)", lambda: malloc_step(True),
               lambda: malloc_step(False)),
    "decode": ("streaming linear layers, compiled fp32 decoding (tokens/s)", lambda: decode_tokens_per_s(),
               lambda: decode_tokens_per_s(kernels=False)),
    "options": ("Inductor options and dict tags, compiled fp32 decoding (tokens/s)", lambda: decode_tokens_per_s(),
                lambda: decode_tokens_per_s(options=False)),
}


def malloc_step(keep):
    """An eager fp32 step in a fresh process (malloc's settings hold for a whole process)."""
    out = subprocess.run([sys.executable, "-m", "bench.accelerations", "--model", MODEL,
                          "--child-malloc", str(int(keep))], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return float(out.split()[-1])


def route_step(onednn):
    """An eager fp32 step with its products through oneDNN or MKL (cpu_paths' choice for this CPU aside)."""
    return step_seconds("fp32", False, True, gemm="onednn" if onednn else "mkl")


def main():
    global MODEL
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", default=",".join(PAIRS), help="comma list of " + ", ".join(PAIRS))
    p.add_argument("--model", default=MODEL, choices=sorted(PRESETS), help="the model (default %(default)s)")
    p.add_argument("--child-malloc", type=int, help=argparse.SUPPRESS)  # malloc_step's process
    args = p.parse_args()
    MODEL = args.model
    if args.child_malloc is not None:
        if args.child_malloc:
            speedups.keep_freed_memory()
        print(step_seconds("fp32", False, False))
        return
    print(f"{MODEL}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name in args.only.split(","):
        what, on, off = PAIRS[name]
        off_figure, on_figure = off(), on()
        print(f"{what}: on {on_figure:.3f}, off {off_figure:.3f}, on/off {on_figure / off_figure:.3f}", flush=True)


if __name__ == "__main__":
    main()
