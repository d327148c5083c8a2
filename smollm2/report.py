"""What train.py prints at start-up and at exit: the model, the data, the batch, precision, compile,
speed-ups and the LR schedule; what a new run will cost; how to resume after a stop."""
import os
import shlex
import signal

from model import flops_per_token
from smollm2 import cpu_paths, devices, optim
from smollm2.checkpoint import resume_names


def param_breakdown(model):
    """Parameter counts by kind; the tied embedding is counted once."""
    groups = {"embeddings (tied with lm_head)": "embed_tokens", "attention q_proj": "q_proj",
              "attention k_proj": "k_proj", "attention v_proj": "v_proj", "attention o_proj": "o_proj",
              "mlp gate_proj": "gate_proj", "mlp up_proj": "up_proj", "mlp down_proj": "down_proj",
              "norms": "norm"}
    counts = dict.fromkeys(groups, 0)
    for name, p in model.named_parameters():  # named_parameters yields a shared tensor once
        label = next(g for g, key in groups.items() if key in name)
        counts[label] += p.numel()
    counts["total"] = sum(p.numel() for p in model.parameters())
    return counts


def describe(run, data):
    """The start-up log: the model, the data, the batch, precision, compile, speed-ups and the LR schedule."""
    model, args, cfg, proc = run.model, run.args, run.model.config, run.proc
    counts = param_breakdown(model)
    print(f"model: {args.init or args.model} | {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
          f"heads {cfg.num_attention_heads}/{cfg.num_key_value_heads} kv, mlp {cfg.intermediate_size}, "
          f"vocab {cfg.vocab_size}")
    for label, n in counts.items():
        print(f"  {label:32s} {n:>13,d}")
    print(f"training FLOPs per token at T={args.seq_len}: {run.flops_per_token / 1e9:.3f} GFLOP")
    print(data.describe())
    print(f"batch: {args.batch_size} x {args.seq_len} tokens x {args.grad_accum} micro-steps x "
          f"{proc.world} processes = {run.tokens_per_step:,} tokens per step | device {proc.device}, "
          f"{run.precision.dtype}{', compiled' if run.loss.compiled else ''}"
          f"{', gradient checkpointing' if args.gradient_checkpointing else ''}"
          f"{', deterministic' if args.deterministic else ''}")
    if advice := devices.batch_advice(proc.type, run.tokens_per_step):
        print(f"batch advice: {advice}")
    describe_how(run)
    print(optimizer_line(args))
    print(lr_schedule(args, run.horizon, run.step, run.horizon_moved))


def describe_how(run):
    """The precision, compile, speed-up, task and FSDP lines of the start-up log."""
    args, proc = run.args, run.proc
    how = ("; training steps on a bf16 copy of the weights, fp32 masters (smollm2/speedups.py)"
           if run.loss.weight_copy else "")
    if args.fsdp and run.precision.dtype == "bf16":
        how = "; under --fsdp as FSDP's mixed precision: bf16 weights gathered, gradients reduced in fp32"
    notice = f"; {run.precision.notice}" if run.precision.notice else ""
    print(f"precision: {run.precision.reason}{how}{notice}")
    print(f"compile: {run.loss.compile_reason}")
    if run.cpu_paths:
        print(cpu_paths.describe(run.cpu_paths))
    if run.speedups:
        print(f"speed-ups (smollm2/speedups.py): {'; '.join(run.speedups)}")
    if run.tasks:
        print("eval tasks: " + ", ".join(f"{t.name} ({len(t.rows):,} rows, chance {t.chance:.2f})" for t in run.tasks)
              + f", zero-shot at every evaluation step (--eval-interval {args.eval_interval})")
    if args.fsdp:
        print(f"fsdp: {len(run.model.model.layers)} decoder layers and the root (embedding = lm_head, final norm) "
              f"sharded over {proc.world} processes; checkpoints are folders of shards; no samples "
              "(sample.py reads the checkpoints)")


def optimizer_line(args):
    """The optimizer line of the start-up log."""
    if args.optimizer == "muon":
        start, end = optim.MUON_MOMENTUM
        return (f"optimizer: Muon (Nesterov momentum {start:g} -> {end:g} over {optim.MUON_MOMENTUM_WARMUP} steps, "
                f"update RMS matched to AdamW's) on the decoder layers' matrices, AdamW (0.9, 0.95) on the "
                f"embedding and norms; weight decay {args.weight_decay:g} on matrices")
    return f"optimizer: AdamW (0.9, 0.95), weight decay {args.weight_decay:g} on matrices"


def lr_schedule(args, horizon, step, moved_from=None):
    """The LR line of the start-up log in words, and the lines that say where a resumed wsd run moved
    its decay and which steps are past the horizon."""
    short = (f" (warning: the warmup is longer than the run's {horizon} steps: the LR never reaches its "
             f"peak {args.lr:g}; lower --warmup)" if args.warmup > horizon else "")
    origin = "the horizon set by this run's first launch" if moved_from is None else "the horizon of this launch"
    if args.schedule == "wsd":
        start = optim.decay_start(horizon, args.decay_frac)
        line = (f"LR: warmup {args.warmup} steps to {args.lr:g}, flat until step {start}, then a {args.decay_shape} "
                f"decay over the last {args.decay_frac:.0%} of the steps to {args.min_lr:g} at step {horizon} "
                f"({origin}), {args.min_lr:g} after it{short}")
    else:
        line = (f"LR: warmup {args.warmup} steps to {args.lr:g}, cosine to {args.min_lr:g} at step {horizon} "
                f"({origin}), {args.min_lr:g} after it{short}")
    if moved_from is not None:
        line += (f"\nwsd: the decay moved to the end of --steps {horizon}: the checkpoint's run (step {step}) "
                 f"was to decay from step {optim.decay_start(moved_from, args.decay_frac)} to {moved_from}, "
                 "and had not begun")
    if args.steps > horizon:
        line += (f"\nsteps {max(step, horizon) + 1}..{args.steps} are past the horizon: LR stays at "
                 f"{args.min_lr:g}")
    return line


def new_run_notice(args, proc, model):
    """--ckpt auto found nothing: where it looked, what the new run trains, and about how long that
    takes here (rough: a quick matmul measurement or the GPU's peak; the step lines' ETA is measured)."""
    facts = devices.device_facts(proc.device)
    dtype = devices.pick_dtype(facts, args.dtype)[0]
    peak = args.peak_flops or (devices.peak_flops(facts.name) if proc.type == "cuda" else None)
    measured = None if peak else devices.matmul_flops(proc.device, model.config.hidden_size,
                                                      min(args.batch_size * args.seq_len, 256))
    gpus = proc.world if proc.type == "cuda" else 1  # CPU processes share this machine's cores
    n_params = sum(p.numel() for p in model.parameters())
    tokens_per_step = args.batch_size * args.seq_len * args.grad_accum * proc.world
    took = devices.time_estimate(args.steps * tokens_per_step, flops_per_token(model.config, args.seq_len, n_params),
                                 devices.training_flops_per_s(dtype, measured, peak) * gpus)
    where = ("this GPU" if gpus == 1 else f"these {gpus} GPUs") if proc.type == "cuda" else \
        "this Mac's GPU" if proc.type == "mps" else "this CPU"
    return (f"--ckpt auto: no checkpoint ({', '.join(resume_names(args.save))}) in "
            f"{os.path.abspath(os.path.dirname(args.save))}: starting a new run of "
            f"{f'--init {args.init}' if args.init else args.model} ({n_params / 1e6:,.1f}M parameters), "
            f"{args.steps:,} steps of {tokens_per_step:,} tokens: {took} on {where}, roughly")


def saved_so_far(saver, args, proc):
    """What a second Ctrl-C, which stops at once, leaves: the checkpoints so far and the command
    that resumes from the newest."""
    if not saver.last_good:
        return "nothing was saved yet"
    path, step = saver.last_good
    best = (saver.best and os.path.exists(saver.best_path)
            and os.path.abspath(saver.best_path) != os.path.abspath(path))
    return (f"the last checkpoint is {path} at step {step}"
            + (f", the best {saver.best_path} at step {saver.best['step']}" if best else "")
            + f"; resume with: {resume_command(args, proc, path)}")


def finished(args, proc, step, saver, status):
    """The run's last lines: what was saved, and how to resume a run that a signal stopped."""
    lines = f"saved {args.save} at step {step}{saver.final_note}; loss curve {args.plot}"
    if status:
        lines += (f"\nstopped by {signal.Signals(status - 128).name}; resume with:\n  "
                  f"{resume_command(args, proc, args.save)}")
    return lines


def resume_command(args, proc, path):
    launcher = f"torchrun --nproc_per_node={proc.world}" if proc.world > 1 else "python"
    return f"{launcher} train.py --steps {args.steps} --ckpt {shlex.quote(path)}"
