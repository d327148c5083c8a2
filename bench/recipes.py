"""Two recipes side by side, as train.py runs them: AdamW + warmup + cosine at a learning rate tuned for
the size, against Muon + WSD with the repo's defaults (only --optimizer muon --schedule wsd given).

    python -m bench.recipes                      # tune, compare, time Muon's step, plot (resumable)
    python -m bench.recipes --plot-only docs/muon-135m.png "AdamW (defaults)=runs/135m/adamw/metrics.jsonl" \\
        "Muon + WSD=runs/135m/muon/metrics.jsonl"

1. AdamW's --lr tuned over --adamw-lrs on --tune-data (input.txt), N = --steps steps each.
2. On --data, a corpus nothing was tuned on (LAMBADA's passages, shipped in data/eval/): AdamW at the
   best LR for N steps, and Muon + WSD for each fraction of N in --fracs: the first run's stable part
   is shared with the longer ones, which resume from its checkpoint at its decay's start with a
   raised --steps (wsd moves the decay to the new end).
3. The steps, tokens and training time each needs to reach AdamW's validation loss at step N.
4. Muon's fixed cost per optimizer step (Newton-Schulz on every hidden matrix), measured here against
   AdamW's step at this size and at 135M, and as a share of a 1,024-token and a 0.5M-token step.
Every run is train.py in a subprocess (one thread each: the runs go two at a time on two cores),
with --ckpt auto, so a killed bench picks up where it stopped. Results: --out/results.json, a PNG.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from model import SmolLM2  # noqa: E402
from smollm2 import optim  # noqa: E402
from smollm2.train_args import model_config  # noqa: E402

RUN = ["--batch-size", "4", "--seq-len", "256", "--eval-iters", "10", "--log-interval", "10",
       "--sample-interval", "0", "--keep-last", "1"]  # 1,024 tokens a step, the CPU default


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="bench/llama-6x384.json", help="the model: a Llama config.json or a preset")
    p.add_argument("--steps", type=int, default=600, help="N: AdamW's steps")
    p.add_argument("--adamw-lrs", default="1e-3,2e-3,4e-3", help="AdamW's learning rates to tune over")
    p.add_argument("--adamw-warmup", type=int, default=60)
    p.add_argument("--fracs", default="0.6,0.75", help="Muon + WSD runs of these fractions of N steps")
    p.add_argument("--tune-data", default="input.txt")
    p.add_argument("--tune-muon", action="store_true", help="also run Muon + WSD (defaults) on --tune-data")
    p.add_argument("--data", default="lambada", help="the comparison corpus; lambada = data/eval's passages")
    p.add_argument("--eval-interval", type=int, default=50)
    p.add_argument("--out", default="runs/recipes")
    p.add_argument("--plot", default="docs/recipes.png")
    p.add_argument("--parallel", type=int, default=2, help="train.py processes at a time")
    p.add_argument("--plot-only", nargs="+", metavar=("PNG", "LABEL=METRICS"),
                   help="only plot these metrics files' validation losses into PNG")
    return p.parse_args(argv)


def lambada_corpus(out):
    """LAMBADA's 5,153 passages (CC BY 4.0; data/eval/lambada_openai.jsonl, context + continuation) as
    one JSONL document each: English fiction, nothing like Shakespeare's verse, and tuned on by no one."""
    path = os.path.join(out, "lambada.jsonl")
    if not os.path.exists(path):
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(ROOT, "data/eval/lambada_openai.jsonl")) as f, open(path, "w") as g:
            for line in f:
                row = json.loads(line)
                g.write(json.dumps({"text": row["context"] + " " + row["continuation"]}) + "\n")
    return path


def metrics_path(save):
    return save[:-3] + "_metrics.jsonl"


BRANCHES = {}  # save: (the save of the run it resumed from, the step it branched off at)


def read_metrics(save):
    """The run's metrics records; a branch's start with its parent's, up to where it branched off."""
    if save in BRANCHES:
        parent, step = BRANCHES[save]
        return [r for r in read_metrics(parent) if r["step"] <= step] + read_metrics_file(save)
    return read_metrics_file(save)


def read_metrics_file(save):
    path = metrics_path(save)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def finished(save, steps):
    records = read_metrics(save)
    return bool(records) and records[-1]["step"] >= steps and os.path.exists(save)


def command(save, steps, data, extra, start_from=None):
    """train.py's command line: --ckpt auto (resume this run, or start it), or for a run that branches
    off another run's checkpoint, that checkpoint until this run has one of its own."""
    own = os.path.isdir(os.path.dirname(save)) and any(n.endswith(".pt") for n in os.listdir(os.path.dirname(save)))
    ckpt = "auto" if own or start_from is None else start_from
    return [sys.executable, os.path.join(ROOT, "train.py"), *RUN, "--steps", str(steps), "--data", data,
            "--ckpt", ckpt, "--save", save, *extra]


def run_all(jobs, parallel):
    """Run [(save, steps, cmd)] that have not finished, `parallel` at a time, one thread each."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    pending = [j for j in jobs if not finished(j[0], j[1])]
    running = []
    while pending or running:
        while pending and len(running) < parallel:
            save, steps, cmd = pending.pop(0)
            os.makedirs(os.path.dirname(save), exist_ok=True)
            log = open(save[:-3] + ".log", "a")
            print(f"run: {' '.join(cmd[1:])}", flush=True)
            running.append((subprocess.Popen(["nice", "-n", "19", *cmd], cwd=ROOT, env=env, stdout=log,
                                             stderr=subprocess.STDOUT), log, save))
        time.sleep(5)
        for proc, log, save in list(running):
            if proc.poll() is not None:
                log.close()
                running.remove((proc, log, save))
                if proc.returncode:
                    raise SystemExit(f"{save}: train.py exited with {proc.returncode}; see {save[:-3]}.log")


def final_val(save):
    vals = [r for r in read_metrics(save) if "val_loss" in r]
    return vals[-1]["val_loss"] if vals else None


def train_seconds(save, upto):
    """Seconds of training (evaluations and saves excluded) to reach step `upto`, from the log's tok/s."""
    seconds, last = 0.0, 0
    for r in read_metrics(save):
        if r["step"] > upto:
            break
        if r["step"] > last and r.get("tok_s"):
            seconds += (r["step"] - last) * 1024 / r["tok_s"]
            last = r["step"]
    return seconds


def tune(args):
    """AdamW's final validation loss at each --adamw-lrs on --tune-data, and Muon + WSD's (defaults)
    beside them: (the best LR, {run: loss})."""
    folder = os.path.join(args.out, os.path.splitext(os.path.basename(args.tune_data))[0])
    saves = {text: os.path.join(folder, f"adamw-lr{text}", "ckpt.pt") for text in args.adamw_lrs.split(",")}
    muon = os.path.join(folder, "muon-wsd", "ckpt.pt")
    jobs = [(save, args.steps, command(save, args.steps, args.tune_data, adamw_flags(args, float(text))))
            for text, save in saves.items()]
    if args.tune_muon:
        jobs.append((muon, args.steps, command(muon, args.steps, args.tune_data, [
            "--model", args.config, "--optimizer", "muon", "--schedule", "wsd", "--eval-interval",
            str(args.eval_interval), "--ckpt-interval", "100"])))
    run_all(jobs, args.parallel)
    losses = {f"adamw lr {text}": final_val(save) for text, save in saves.items()}
    best = min(saves, key=lambda text: losses[f"adamw lr {text}"])
    if args.tune_muon:
        losses["muon + wsd, defaults"] = final_val(muon)
    print(f"on {args.tune_data}, {args.steps} steps: " + ", ".join(f"{k} -> val {v:.4f}" for k, v in losses.items())
          + f"; AdamW's best lr {best}")
    return float(best), losses


def adamw_flags(args, lr):
    return ["--model", args.config, "--lr", f"{lr:g}", "--min-lr", f"{lr / 10:g}", "--warmup",
            str(args.adamw_warmup), "--eval-interval", str(args.eval_interval), "--ckpt-interval", "100"]


def compare(args, lr, data):
    """AdamW at lr for N steps, Muon + WSD at each fraction of N; [(label, save, steps)]."""
    adamw = os.path.join(args.out, "compare", f"adamw-lr{lr:g}", "ckpt.pt")
    runs = [(f"AdamW lr {lr:g}, warmup {args.adamw_warmup} + cosine, {args.steps} steps", adamw, args.steps)]
    jobs = [(adamw, args.steps, command(adamw, args.steps, data, adamw_flags(args, lr)))]
    fracs = sorted(float(x) for x in args.fracs.split(","))
    first = None
    for frac in fracs:
        steps = round(frac * args.steps)
        save = os.path.join(args.out, "compare", f"muon-wsd-{steps}", "ckpt.pt")
        flat = optim.decay_start(steps, 0.2)  # the defaults' --decay-frac 0.2
        extra = ["--model", args.config, "--optimizer", "muon", "--schedule", "wsd", "--eval-interval",
                 str(args.eval_interval), "--ckpt-interval", str(flat if first is None else 100)]
        start_from = None if first is None else os.path.join(os.path.dirname(first[0]), f"ckpt_step_{first[1]}.pt")
        jobs.append((save, steps, command(save, steps, data, extra, start_from)))
        if first is not None:
            BRANCHES[save] = (first[0], first[1])
        runs.append((f"Muon + WSD (defaults), {steps} steps", save, steps))
        first = first or (save, flat)
    run_all(jobs[:2], args.parallel)  # the longer Muon runs branch off the first one's checkpoint
    run_all(jobs[2:], args.parallel)
    return runs


def report(runs):
    """Each run's steps, tokens and training time to AdamW's final validation loss (the first run's)."""
    label0, save0, steps0 = runs[0]
    target = final_val(save0)
    rows = []
    for label, save, steps in runs:
        vals = [r for r in read_metrics(save) if "val_loss" in r and r["step"] > 0]
        reached = next((r["step"] for r in vals if r["val_loss"] <= target), None)
        rows.append({"run": label, "steps": steps, "final_val_loss": final_val(save), "first_step_at_target": reached,
                     "tokens_to_target": reached and reached * 1024,
                     "train_seconds_to_target": reached and round(train_seconds(save, reached), 1),
                     "steps_vs_adamw": reached and round(reached / steps0, 3)})
    print(f"target: {label0}'s validation loss at step {steps0}, {target:.4f}")
    for r in rows:
        at = (f"reaches it at step {r['first_step_at_target']} ({r['steps_vs_adamw']:.2f} N, "
              f"{r['tokens_to_target']:,} tokens, {r['train_seconds_to_target']:.0f} s of training)"
              if r["first_step_at_target"] else "does not reach it")
        print(f"  {r['run']}: final val {r['final_val_loss']:.4f}; {at}")
    return {"target_val_loss": target, "rows": rows}


def newton_schulz_flops(model):
    """FLOPs of Muon's 5 Newton-Schulz iterations over every hidden matrix: per matrix (m <= n)
    X X^T (2 m^2 n), the quintic's A A (2 m^3) and B X (2 m^2 n), five times."""
    total = 0
    for _, p in optim.muon_matrices(model):
        m, n = sorted(p.shape)
        total += 5 * (4 * m * m * n + 2 * m ** 3)
    return total


def optimizer_step_ms(model, kind, repeats=2):
    """The fastest of `repeats` optimizer steps after a first one (the gradients random, fp32 masters), in ms."""
    ns = argparse.Namespace(optimizer=kind, lr=1e-3, weight_decay=0.1)
    opt = optim.make_optimizer(model, ns, fused=True)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    times = []
    for _ in range(repeats + 1):
        t = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t)
    return min(times[1:]) * 1e3


def muon_overhead(config_name, step_seconds_1024):
    """Muon's extra cost per step, measured here and computed for 1,024- and 0.5M-token steps."""
    model = SmolLM2(model_config(config_name))
    n_params = sum(p.numel() for p in model.parameters())
    adamw, muon = optimizer_step_ms(model, "adamw"), optimizer_step_ms(model, "muon")
    ns = newton_schulz_flops(model)
    train_flops = lambda tokens: 6 * n_params * tokens  # noqa: E731  (attention's share left out)
    row = {"model": config_name, "params": n_params, "threads": torch.get_num_threads(),
           "adamw_step_ms": round(adamw, 1), "muon_step_ms": round(muon, 1),
           "extra_ms": round(muon - adamw, 1), "newton_schulz_gflop": round(ns / 1e9, 1),
           "ns_share_of_flops_1024_tokens": round(ns / (ns + train_flops(1024)), 3),
           "ns_share_of_flops_512k_tokens": round(ns / (ns + train_flops(512 * 1024)), 4)}
    if step_seconds_1024:
        row["extra_share_of_a_1024_token_step_here"] = round((muon - adamw) / 1e3 / step_seconds_1024, 2)
    print(f"Muon's cost, {config_name} ({n_params / 1e6:.1f}M), {row['threads']} threads: optimizer step "
          f"{muon:.0f} ms against AdamW's {adamw:.0f} ms (+{muon - adamw:.0f} ms); Newton-Schulz {ns / 1e9:.0f} GFLOP "
          f"= {row['ns_share_of_flops_1024_tokens']:.0%} of a 1,024-token step's FLOPs, "
          f"{row['ns_share_of_flops_512k_tokens']:.2%} of a 0.5M-token step's")
    return row


def step_seconds(save):
    rates = sorted(r["tok_s"] for r in read_metrics(save) if r.get("tok_s"))
    return 1024 / rates[len(rates) // 2] if rates else None


def plot(png, curves, title):
    """Validation loss against steps, one line per (label, metrics records); the tokens on a top axis."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4.8))
    for label, records in curves:
        vals = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
        ax.plot(*zip(*vals), marker=".", label=label)
    ax.set_xlabel("optimizer step (1,024 tokens each)")
    ax.set_ylabel("validation loss")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(png) or ".", exist_ok=True)
    fig.savefig(png, dpi=110)
    print(f"plot: {png}")


def main(argv=None):
    args = parse_args(argv)
    if args.plot_only:
        png, *pairs = args.plot_only
        curves = []
        for label, path in (pair.split("=", 1) for pair in pairs):
            with open(path) as f:
                curves.append((label, [json.loads(line) for line in f if line.strip()]))
        plot(png, curves, "SmolLM2-135M on input.txt, 1,024 tokens a step")
        return
    lr, tuned = tune(args)
    data = lambada_corpus(args.out) if args.data == "lambada" else args.data
    runs = compare(args, lr, data)
    results = {"tuning": tuned, "best_adamw_lr": lr, **report(runs)}
    small = step_seconds(runs[0][1])
    results["muon_cost"] = [muon_overhead(args.config, small), muon_overhead("smollm2-135m", None)]
    plot(args.plot, [(label, read_metrics(save)) for label, save, _ in runs],
         f"{os.path.basename(args.config)} on LAMBADA passages, 1,024 tokens a step, seed 1337")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    print(f"results: {os.path.join(args.out, 'results.json')}")


if __name__ == "__main__":
    main()
