"""Benchmark: per-process memory and step time of DDP against --fsdp's sharding (smollm2/sharding.py),
on CPU ranks with gloo: what each rank holds between steps (weights, gradients, AdamW's moments),
its peak RSS, and the median step time. Each mode runs under its own torchrun.

    python -m bench.sharding [--model smollm2-360m] [--ranks 2] [--seq-len 64]
"""
import argparse
import os
import re
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def worker(mode, model_name, seq_len, steps=4):
    """One rank: the model under DDP or fully_shard'ed, fp32, fused AdamW, `steps` steps; prints its line."""
    sys.path.insert(0, ROOT)
    import torch
    import torch.distributed as dist
    from model import PRESETS, SmolLM2
    from smollm2 import sharding
    from smollm2.chunked_loss import ChunkedLoss
    from smollm2.distributed import Process
    proc = Process("cpu")
    proc.start()
    torch.manual_seed(0)
    model = SmolLM2(PRESETS[model_name]).train()
    if mode == "fsdp":
        loss = sharding.shard(ChunkedLoss(model), model, proc, "fp32")
    else:
        loss = torch.nn.parallel.DistributedDataParallel(ChunkedLoss(model))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def local(t):
        return t.to_local() if hasattr(t, "to_local") else t

    def held():
        params = list(model.parameters())
        moments = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v) and v.dim()]
        return sum(local(t).nbytes for t in params + [p.grad for p in params if p.grad is not None] + moments)

    x = torch.randint(0, model.config.vocab_size, (1, seq_len))
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        loss(x, x).backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
        tensors = held()
        optimizer.zero_grad(set_to_none=False)
    with open("/proc/self/status") as f:
        hwm = next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) * 1024
    # one write per line: torchrun's ranks share our stdout unbuffered, where print's text and newline could interleave
    os.write(1, f"RESULT {mode} {proc.rank} {tensors} {hwm} {statistics.median(times[1:])}\n".encode())
    dist.barrier()
    os._exit(0)  # as train.py's exit_process: no gloo teardown race


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-360m")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--worker", choices=["ddp", "fsdp"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args.worker, args.model, args.seq_len)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    print(f"{args.model}, fp32, {args.ranks} gloo ranks, B=1, T={args.seq_len} per rank; per rank:")
    for mode in ("ddp", "fsdp"):
        out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                              f"--nproc_per_node={args.ranks}", "-m", "bench.sharding", "--worker", mode,
                              "--model", args.model, "--seq-len", str(args.seq_len)],
                             cwd=ROOT, env=env, capture_output=True, text=True)
        rows = [line.split()[1:] for line in out.stdout.splitlines() if re.match(r"RESULT ", line)]
        if out.returncode or len(rows) != args.ranks:
            sys.exit(f"bench.sharding: the {mode} run failed (exit {out.returncode}, {len(rows)} of {args.ranks} ranks "
                     f"reported):\n{out.stderr[-2000:]}")
        for _, rank, tensors, hwm, step in sorted(rows, key=lambda r: int(r[1])):
            print(f"  {mode:5s} rank {rank}: weights + gradients + AdamW held {int(tensors) / 2**20:,.0f} MiB, "
                  f"peak RSS {int(hwm) / 2**20:,.0f} MiB, step {float(step):.2f} s")


if __name__ == "__main__":
    main()
