"""Train SmolLM2 from scratch or fine-tune it, nanoGPT-style, with exact resume and atomic checkpoints.

    python train.py --steps 5000                             # train on input.txt -> checkpoint.pt
    python train.py --steps 5050 --ckpt checkpoint.pt        # 50 more steps, as if never stopped
    python train.py --steps 5000 --ckpt auto                 # resume from the newest checkpoint, if any
    torchrun --nproc_per_node=8 train.py --steps 5000        # DDP: nccl on GPUs, gloo on CPU
    python train.py --init model.gguf --steps 200 --lr 1e-4  # fine-tune from real SmolLM2 weights
    python train.py --export checkpoint.pt out/              # HF-format directory for transformers
    python train.py --export checkpoint.pt model.gguf        # one GGUF file for llama.cpp / Ollama

A checkpoint (smollm2/checkpoint.py) is one torch.save'd dict that loads with weights_only=True: the model,
optimizer, step, LR horizon, the loader's position and the data's fingerprint, every RNG state, the
run's arguments and the precision's state (fp16's GradScaler, skipped steps). Each is written
atomically; best.pt keeps the lowest validation loss; the disk's free space is checked before
training and a failed save is one line, not a lost run.
"""
import contextlib
import math
import os
import shlex
import signal
import sys

import torch

from model import PRESETS, SmolLM2, SmolLM2Config, flops_per_token, param_breakdown
from smollm2 import devices, loggers, sharding, speedups, zero_shot
from smollm2.chunked_loss import ChunkedLoss
from smollm2.checkpoint import (Saver, check_disk_space, data_change, find_latest, load_checkpoint, resume_names,
                                set_rng_state)
from smollm2.cli import main_guard
from smollm2.distributed import Process, exit_process
from smollm2.documents import resolve_files
from smollm2.errors import UsageError
from smollm2.files import check_writable
from smollm2.loss_eval import validation_loss
from smollm2.precision import Precision
from smollm2.run_lock import RunLock
from smollm2.sampling import sample_text
from smollm2.signals import StopSignals
from smollm2.token_cache import dataset_stats, fingerprint
from smollm2.tokenizer import load_tokenizer
from smollm2.train_args import DEFAULTS, build_parser, check_args, resolve_args
from smollm2.train_data import load_data
from smollm2.training_loss import TrainingLoss


def get_lr(step, lr, min_lr, warmup, horizon):
    """LR of optimizer step `step` (0-based): linear warmup, cosine decay to min_lr at `horizon`
    (the first run's --steps), min_lr after it."""
    if step >= horizon:
        return min_lr
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, horizon - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


# ----------------------------------------------------------------------------- set-up
def build_model(args, ckpt, proc):
    torch.manual_seed(args.seed)
    if ckpt:
        model = SmolLM2(SmolLM2Config(**ckpt["config"]))
        if not ckpt.get("sharded"):  # a sharded checkpoint's weights load once the model is sharded
            model.load_state_dict(ckpt["model"])
    elif args.init:
        model = SmolLM2.from_pretrained(args.init)
        if args.seq_len > model.config.max_position_embeddings:
            raise UsageError(f"--seq-len {args.seq_len} exceeds the context window of {args.init}, "
                             f"{model.config.max_position_embeddings}")
    else:
        model = SmolLM2(PRESETS[args.model])
    model.gradient_checkpointing = args.gradient_checkpointing
    return model.to(proc.device).train()


def make_optimizer(model, args, proc):
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": args.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]  # norms: no decay
    # fused: one kernel for every parameter (on CPU since torch 2.4: 55 ms a step at 135M against 285)
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
                             fused=True if proc.type in ("cuda", "cpu") else None)


class Run:
    """The model, optimizer, data and loop state of a training run: everything a checkpoint holds."""

    def __init__(self, args, ckpt, proc, loader, val, tasks=()):
        self.args, self.proc, self.loader, self.val = args, proc, loader, val
        facts = devices.device_facts(proc.device)
        self.precision = Precision(facts, sharding.fsdp_dtype(facts, args.dtype) if args.fsdp else args.dtype,
                                   proc.device)
        if proc.type == "cuda":
            torch.set_float32_matmul_precision("high")  # TF32 matmuls for whatever runs in fp32
        self.model = build_model(args, ckpt, proc)  # the SmolLM2 itself: what checkpoints save
        self.sharded = None  # --fsdp: the sharded root, the chunked loss around the model (sharding.py)
        if args.fsdp:
            self.sharded = sharding.shard(ChunkedLoss(self.model), self.model, proc, self.precision.dtype)
            self.precision.autocast = contextlib.nullcontext()  # FSDP gathers bf16 weights itself
        self.optimizer = make_optimizer(self.model, args, proc)
        self.step, self.horizon, self.val_loss = 0, args.steps, None
        self.history = {"step": [], "loss": [], "val_step": [], "val_loss": []}
        if ckpt and ckpt.get("sharded"):  # DCP reshards what another number of ranks wrote
            sharding.load_sharded(ckpt["sharded"], self.model, self.optimizer)
        elif ckpt:
            self.optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt:
            self.optimizer.param_groups[0]["weight_decay"] = args.weight_decay  # may be overridden
            if ckpt["data"] is not None:  # None: the data changed since (checkpoint.data_change)
                loader.load_state_dict(ckpt["data"])
            set_rng_state(ckpt["rng"])
            self.step, self.horizon, self.val_loss = ckpt["step"], ckpt["lr_horizon"], ckpt.get("val_loss")
            self.history = ckpt.get("history") or self.history
            self.precision.load_state_dict(ckpt.get("scaler"))
        # what a micro-step calls: the chunked loss, compiled or not, under DDP or not
        self.loss = TrainingLoss(self.model, proc, self.precision, args.compile, self.horizon,
                                 args.gradient_checkpointing, args.batch_size * args.seq_len, self.sharded)
        self.loss.probe(args.batch_size, args.seq_len, self.optimizer)
        self.tokens_per_step = args.batch_size * args.seq_len * args.grad_accum * proc.world
        n_params = sum(p.numel() for p in self.model.parameters())
        self.flops_per_token = flops_per_token(self.model.config, args.seq_len, n_params)
        self.peak_flops = args.peak_flops or (devices.peak_flops(facts.name) if proc.type == "cuda" else None)
        self.tasks = list(tasks)  # --eval-tasks: zero-shot tasks scored at evaluation steps
        self.tokenizer = load_tokenizer() if self.tasks else None

    def train_step(self):
        """One optimizer step over grad_accum micro-batches; returns (mean loss, grad norm) tensors."""
        args, precision = self.args, self.precision
        loss_sum = torch.zeros((), device=self.proc.device)
        for micro in range(args.grad_accum):
            batch = [t.to(self.proc.device, non_blocking=True) for t in self.loader.next_batch()]  # x, y[, doc]
            self.loss.sync_gradients(micro == args.grad_accum - 1)  # DDP: all-reduce in the last backward
            loss = self.loss(*batch) / args.grad_accum  # the sum over micro-steps is the mean over the batch
            loss_sum += loss.detach()
            precision.backward(loss)
            self.loss.after_backward()
        precision.unscale(self.optimizer)
        norm = sharding.full_norm(torch.nn.utils.clip_grad_norm_(self.model.parameters(), args.grad_clip or math.inf))
        precision.step(self.optimizer, norm)
        self.optimizer.zero_grad(set_to_none=True)
        self.loss.after_step()
        return loss_sum, norm  # this rank's loss: averaged over the ranks at log steps only

    def evaluate(self):
        self.val_loss = validation_loss(self.loss.chunked, self.val, self.args.batch_size, self.args.seq_len,
                                        self.args.eval_iters, self.proc, self.precision.autocast,
                                        lockstep=self.sharded is not None)
        return self.val_loss

    def score_tasks(self):
        """{task: accuracy} of --eval-tasks, on every rank (under --fsdp every forward pass is every
        rank's), in the run's precision; the training's random state and mode untouched."""
        if self.sharded is not None:
            self.sharded.unshard()  # the root's weights (embedding = lm_head, final norm), whole
        try:
            dtype = self.precision.dtype if self.sharded is None else "fp32"  # FSDP: bf16 weights already
            return {task.name: zero_shot.score_task(self.model, self.tokenizer, task, self.proc.device, dtype)["accuracy"]
                    for task in self.tasks}
        finally:
            if self.sharded is not None:
                self.sharded.reshard()

    def sample(self):
        text = sample_text(self.model, self.args.sample_prompt, self.args.sample_tokens, self.args.seed)
        print(f"sample: {text!r}", flush=True)


def load_tasks(args):
    """The --eval-tasks tasks, loaded and checked (a bad name or file: one line, before training)."""
    if not args.eval_tasks:
        return []
    return [zero_shot.load_task(name, None, rows) for name, rows in zero_shot.parse_tasks(args.eval_tasks)]


def describe(run, tokens):
    """The start-up log: the model, the data, the batch, precision, compile and the LR schedule."""
    model, args, cfg, proc = run.model, run.args, run.model.config, run.proc
    counts = param_breakdown(model)
    print(f"model: {args.init or args.model} | {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
          f"heads {cfg.num_attention_heads}/{cfg.num_key_value_heads} kv, mlp {cfg.intermediate_size}, "
          f"vocab {cfg.vocab_size}")
    for label, n in counts.items():
        print(f"  {label:32s} {n:>13,d}")
    fpt = flops_per_token(cfg, args.seq_len, counts["total"])
    print(f"training FLOPs per token at T={args.seq_len}: {fpt / 1e9:.3f} GFLOP")
    val = f"validation tokens {len(run.val) if run.val is not None else 0:,}" + \
        (f" from {args.val_data}" if args.val_data else "")
    if tokens is None:  # a stream: nothing counted ahead
        print(f"data: {args.data} | {run.loader.describe()} | {val}")
    else:
        stats = {"bytes": sum(os.path.getsize(f) for f in resolve_files(args.data)), **dataset_stats(tokens)}
        print(f"data: {args.data} | {', '.join(f'{k} {v:,}' for k, v in stats.items())} | train batches per "
              f"epoch {run.loader.batches_per_epoch:,}, {val}")
    print(f"batch: {args.batch_size} x {args.seq_len} tokens x {args.grad_accum} micro-steps x "
          f"{proc.world} processes = {run.tokens_per_step:,} tokens per step | device {proc.device}, "
          f"{run.precision.dtype}{', compiled' if run.loss.compiled else ''}"
          f"{', gradient checkpointing' if args.gradient_checkpointing else ''}"
          f"{', deterministic' if args.deterministic else ''}")
    if advice := devices.batch_advice(proc.type, run.tokens_per_step):
        print(f"batch advice: {advice}")
    how = ("; training steps on a bf16 copy of the weights, fp32 masters (smollm2/speedups.py)"
           if run.loss.weight_copy else "")
    if args.fsdp and run.precision.dtype == "bf16":
        how = "; under --fsdp as FSDP's mixed precision: bf16 weights gathered, gradients reduced in fp32"
    notice = f"; {run.precision.notice}" if run.precision.notice else ""
    print(f"precision: {run.precision.reason}{how}{notice}")
    print(f"compile: {run.loss.compile_reason}")
    if run.tasks:
        print("eval tasks: " + ", ".join(f"{t.name} ({len(t.rows):,} rows, chance {t.chance:.2f})" for t in run.tasks)
              + f", zero-shot at every evaluation step (--eval-interval {args.eval_interval})")
    if args.fsdp:
        print(f"fsdp: {len(model.model.layers)} decoder layers and the root (embedding = lm_head, final norm) "
              f"sharded over {proc.world} processes; checkpoints are folders of shards; no samples "
              "(sample.py reads the checkpoints)")
    short = (f" (warning: the warmup is longer than the run's {run.horizon} steps: the LR never reaches its "
             f"peak {args.lr:g}; lower --warmup)" if args.warmup > run.horizon else "")
    print(f"LR: warmup {args.warmup} steps to {args.lr:g}, cosine to {args.min_lr:g} at step {run.horizon} "
          f"(the horizon set by this run's first launch), {args.min_lr:g} after it{short}")
    if args.steps > run.horizon:
        print(f"steps {max(run.step, run.horizon) + 1}..{args.steps} are past the horizon: LR stays at {args.min_lr:g}")


# ----------------------------------------------------------------------------- the loop
def train(run, saver, stop):
    """The loop; returns the exit status: 0, or 128 + the signal that stopped it."""
    args, master = run.args, run.proc.master
    if run.step == 0 and run.val is not None:
        run.history["val_step"].append(0)
        run.history["val_loss"].append(run.evaluate())
        if master:
            print(f"step 0 | val loss {run.val_loss:.4f}", flush=True)
    if run.step == 0 and run.tasks:  # where the accuracy curves start
        accuracies = run.score_tasks()
        loggers.record_tasks(run.history, 0, accuracies)
        if master:
            print("step 0" + loggers.tasks_text(accuracies), flush=True)
    clock = loggers.Clock(run.step, run.proc.device)
    while run.step < args.steps:
        lr = get_lr(run.step, args.lr, args.min_lr, args.warmup, run.horizon)
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        loss, norm = run.train_step()
        run.step += 1
        step, last = run.step, run.step == args.steps
        stopping = stop.should_stop()  # a signal on any rank: every rank saves and stops after this step
        hurry = stopping and run.proc.any_rank(stop.hurry)  # a second signal: no evaluation or sample first
        evaluating = (run.val is not None or run.tasks) and (step % args.eval_interval == 0 or last) and not hurry
        periodic = args.ckpt_interval and step % args.ckpt_interval == 0
        if evaluating or periodic or last or stopping:  # a checkpoint may follow: a stream's ranks share
            run.loader.share()  # their positions now (a host-side gather), not at every step
        val = accuracies = None
        if evaluating:
            with clock.pause():
                val = run.evaluate() if run.val is not None else None
                accuracies = run.score_tasks() if run.tasks else None
        if step % args.log_interval == 0 or last or stopping or evaluating:
            loss = run.proc.all_sum(loss) / run.proc.world  # on every rank: an all-reduce
            if master:
                loss = loggers.log_step(run, step, loss, norm, lr, val, clock, accuracies)
                if run.precision.diverged(loss):
                    raise SystemExit(f"loss is {loss} at step {step}: training diverged; lower --lr or raise --warmup")
            clock = loggers.Clock(step, run.proc.device)
        saves = master or run.sharded is not None  # under --fsdp every rank writes its shards
        with clock.pause():
            if master and args.sample_interval and step % args.sample_interval == 0 and not hurry and not args.fsdp:
                run.sample()
            if saves and val is not None:
                saver.keep_best(run, step, val)
            if saves and periodic:
                saver.periodic(run, step)
        if stopping and not last:
            return 128 + (stop.received or signal.SIGTERM)  # another rank's signal: SIGTERM here
    return 0


def main(argv=None):
    args = build_parser(__doc__.split("\n")[0]).parse_args(argv)
    if args.export or args.push_to_hub:
        import export  # export.py: GGUF files, HF directories with a model card, hub uploads
        if not args.export:
            raise UsageError("--push-to-hub uploads an export: give --export SRC OUT with it")
        return export.export(*args.export, args.dtype, args.push_to_hub)
    proc = Process(args.device)
    auto = args.ckpt == "auto"
    if auto:
        ckpt = resume_latest(args, proc)
        if ckpt and ckpt["step"] >= args.steps:
            print(f"--ckpt auto: {args.ckpt} is at step {ckpt['step']} already (--steps {args.steps}): "
                  "nothing to train")
            return 0
    else:
        ckpt = load_checkpoint(args.ckpt) if args.ckpt else None
    check_args(args, ckpt)
    if ckpt and not auto and proc.master:  # --ckpt auto said so when it found it
        print(f"resuming from {args.ckpt} at step {ckpt['step']}", flush=True)
    if args.fsdp:
        sharding.check_fsdp(proc, args.dtype)
        saved_world = ckpt["args"].get("world_size", 1) if ckpt else proc.world
        if saved_world != proc.world and proc.master:
            print(f"{args.ckpt} was sharded over {saved_world} processes, this run has {proc.world}: "
                  "DCP reshards it as it loads", flush=True)
    changed = resolve_args(args, ckpt["args"] if ckpt else None, proc.world)
    if args.deterministic:  # before anything runs on the device (cuBLAS reads its setting once)
        devices.deterministic_mode(proc.type)
    check_writable(args.save, args.metrics, args.plot)
    tasks = load_tasks(args)  # a bad task name or file: one line, before anything heavy
    lock = RunLock(args.save) if proc.master else None  # a second run on this --save stops here
    trackers = None
    new_run = auto and ckpt is None and proc.master  # --ckpt auto found nothing: say what starts
    try:
        if new_run and not args.init:  # a preset's size is known before anything is built
            with torch.device("meta"):  # no memory, no time
                preset = SmolLM2(PRESETS[args.model])
            print(new_run_notice(args, proc, preset), flush=True)
        # a missing tracker package stops the run here (MissingPackage), before anything heavy
        trackers = loggers.Loggers(args, ckpt["step"] if ckpt else 0, proc.master)
        proc.start()
        tokens, loader, val = load_data(args, proc)  # DataError: before anything heavy is built
        data_id = fingerprint(args.data, column=args.text_column)
        if ckpt and (notice := data_change(ckpt, data_id, args.data)) and proc.master:
            print(notice, file=sys.stderr, flush=True)
        if proc.type == "cpu" and not args.fsdp:  # FSDP frees each gathered layer: give that back
            speedups.keep_freed_memory()
        run = Run(args, ckpt, proc, loader, val, tasks)
        if new_run and args.init:  # the --init source's size is known once it is loaded
            print(new_run_notice(args, proc, run.model), flush=True)
        run.data_fingerprint, run.trackers = data_id, trackers
        saver = Saver(args, args.ckpt, ckpt, master=proc.master)
        del ckpt
        check_disk_space(args.save, run.model, run.optimizer)  # before hours of training, not after
        if proc.master:
            if changed:
                print(f"resuming with changed settings: {', '.join(f'{k}={getattr(args, k)}' for k in changed)}")
            describe(run, tokens)
        with StopSignals(proc, saved=lambda: saved_so_far(saver, args, proc)) as stop:
            status = train(run, saver, stop)
            if run.sharded is not None and not saver.final(run, run.step):
                return 1
            if proc.master:
                if run.sharded is None and not saver.final(run, run.step):
                    return 1
                print(f"saved {args.save} at step {run.step}{saver.final_note}; loss curve {args.plot}",
                      flush=True)
                if status:
                    print(f"stopped by {signal.Signals(status - 128).name}; resume with:\n  "
                          f"{resume_command(args, proc, args.save)}", flush=True)
        return status
    finally:
        if trackers is not None:
            trackers.close()
        if lock is not None:
            lock.release()


def resume_latest(args, proc):
    """--ckpt auto: the newest checkpoint beside --save that loads (args.ckpt becomes its path), or
    None for a new run. The same command line, re-run after a crash, so continues the run."""
    save = args.save or DEFAULTS["save"]
    args.ckpt, ckpt = find_latest(save, say=proc.master)
    if ckpt and proc.master:  # none: main says what the new run trains (new_run_notice)
        print(f"--ckpt auto: resuming from {args.ckpt} at step {ckpt['step']}", flush=True)
    if ckpt:
        args.init = None  # the checkpoint already holds the weights --init started the run from
    return ckpt


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


def resume_command(args, proc, path):
    launcher = f"torchrun --nproc_per_node={proc.world}" if proc.world > 1 else "python"
    return f"{launcher} train.py --steps {args.steps} --ckpt {shlex.quote(path)}"


if __name__ == "__main__":
    main_guard(main, "train.py", exit=exit_process,
               interrupted="interrupted before training started; nothing saved")
