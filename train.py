"""Train SmolLM2 from scratch or fine-tune it, nanoGPT-style, with exact resume and atomic checkpoints.

    python train.py --steps 5000                             # train on input.txt -> checkpoint.pt
    python train.py --steps 5050 --ckpt checkpoint.pt        # 50 more steps, as if never stopped
    python train.py --steps 5000 --ckpt auto                 # resume from the newest checkpoint, if any
    torchrun --nproc_per_node=8 train.py --steps 5000        # DDP: nccl on GPUs, gloo on CPU
    python train.py --init model.gguf --steps 200 --lr 1e-4  # fine-tune from real SmolLM2 weights
    python train.py --export checkpoint.pt out/              # HF-format directory for transformers
    python train.py --export checkpoint.pt model.gguf        # one GGUF file for llama.cpp / Ollama

A checkpoint (checkpoint.py) is one torch.save'd dict that loads with weights_only=True: the model,
optimizer, step, LR horizon, the loader's position and the data's fingerprint, every RNG state, the
run's arguments and the precision's state (fp16's GradScaler, skipped steps). Each is written
atomically; best.pt keeps the lowest validation loss; the disk's free space is checked before
training and a failed save is one line, not a lost run.
"""
import contextlib
import math
import os
import signal
import sys

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import data
from checkpoint import (CheckpointError, Saver, check_disk_space, data_change, find_latest, load_checkpoint,
                        set_rng_state)
import sources
import loggers
import devices
import train_kernels
from model import PRESETS, SmolLM2, SmolLM2Config, flops_per_token, param_breakdown
from weights import ModelLoadError
from cli import DEFAULTS, UsageError, build_parser, check_args, check_writable, resolve_args
from ddp import Dist, exit_process


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
def load_data(args, where):
    """(the training tokens, or None for a stream; the loader; the validation tokens or None).
    Validation: --val-data if given (a stream's first --val-tokens), else the tail of file data
    (--val-frac) or the first --val-tokens of a stream, held out of training."""
    def corpus(spec):  # rank 0 tokenises (or finds the cache) first; the others then read the cache
        if where.master:
            tokens = data.tokenize_corpus(spec, progress=sys.stderr.isatty(), text_column=args.text_column)
        where.barrier()
        if not where.master:
            tokens = data.tokenize_corpus(spec, progress=False, text_column=args.text_column)
        return tokens
    val, held = None, f"--val-frac {args.val_frac}"
    if args.val_data:
        val, held = (sources.stream_head(args.val_data, args.val_tokens, args.text_column)[0]
                     if sources.is_stream(args.val_data) else corpus(args.val_data)), f"--val-data {args.val_data}"
    if sources.is_stream(args.data):
        tokens = None
        loader = sources.StreamLoader(args.data, args.batch_size, args.seq_len, where.rank, where.world,
                                      args.grad_accum, args.text_column, 0 if args.val_data else args.val_tokens)
        val, held = (val, held) if args.val_data else (loader.val, f"--val-tokens {args.val_tokens}")
    else:
        tokens = train = corpus(args.data)
        if val is None and args.val_frac:
            train, val = data.split_train_val(tokens, args.val_frac)
        loader = data.DataLoaderLite(train, args.batch_size, args.seq_len, where.rank, where.world)
    if val is not None:
        try:
            data.DataLoaderLite(val, args.batch_size, args.seq_len)
        except data.DataError as e:
            raise data.DataError(f"validation data ({held}) of {args.val_data or args.data}: {e}; "
                                 f"give more, or {held.split()[0]} 0 for no validation") from None
    return tokens, loader, val


def build_model(args, ckpt, where):
    torch.manual_seed(args.seed)
    if ckpt:
        model = SmolLM2(SmolLM2Config(**ckpt["config"]))
        model.load_state_dict(ckpt["model"])
    elif args.init:
        model = SmolLM2.from_pretrained(args.init)
        if args.seq_len > model.config.max_position_embeddings:
            raise UsageError(f"--seq-len {args.seq_len} exceeds the context window of {args.init}, "
                             f"{model.config.max_position_embeddings}")
    else:
        model = SmolLM2(PRESETS[args.model])
    return model.to(where.device).train()


def make_optimizer(model, args, where):
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": args.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]  # norms: no decay
    # fused: one kernel for every parameter (on CPU since torch 2.4: 55 ms a step at 135M against 285)
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
                             fused=True if where.type in ("cuda", "cpu") else None)


def describe(run, tokens, where):
    model, args, cfg = run.raw_model, run.args, run.raw_model.config
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
        stats = {"bytes": sum(os.path.getsize(f) for f in data.resolve_files(args.data)), **data.dataset_stats(tokens)}
        print(f"data: {args.data} | {', '.join(f'{k} {v:,}' for k, v in stats.items())} | train batches per "
              f"epoch {run.loader.batches_per_epoch:,}, {val}")
    print(f"batch: {args.batch_size} x {args.seq_len} tokens x {args.grad_accum} micro-steps x "
          f"{where.world} processes = {run.tokens_per_step:,} tokens per step | device {where.device}, "
          f"{run.dtype}{', compiled' if run.compiled else ''}"
          f"{', gradient checkpointing' if args.gradient_checkpointing else ''}")
    how = "; training steps on a bf16 copy of the weights, fp32 masters (train_kernels.py)" if run.low else ""
    print(f"precision: {run.dtype_reason}{how}" + (f"; {run.dtype_notice}" if run.dtype_notice else ""))
    print(f"compile: {run.compile_reason}")
    print(f"LR: warmup {args.warmup} steps to {args.lr:g}, cosine to {args.min_lr:g} at step {run.horizon} "
          f"(the horizon set by this run's first launch), {args.min_lr:g} after it")
    if args.steps > run.horizon:
        print(f"steps {max(run.step, run.horizon) + 1}..{args.steps} are past the horizon: LR stays at {args.min_lr:g}")


# ----------------------------------------------------------------------------- training
class Run:
    """The model, optimizer, data and loop state: everything a checkpoint holds."""

    def __init__(self, args, ckpt, where, loader, val):
        self.args, self.where, self.loader, self.val = args, where, loader, val
        facts = devices.device_facts(where.device)
        self.dtype, self.dtype_reason = devices.pick_dtype(facts, args.dtype)
        self.autocast = devices.autocast(where.type, self.dtype)
        self.scaler = devices.grad_scaler(where.type, self.dtype)  # fp16 only
        self.skipped, self.pending_skips = 0, torch.zeros((), dtype=torch.long, device=where.device)
        self.dtype_notice = None
        if where.type == "cuda":
            torch.set_float32_matmul_precision("high")  # TF32 matmuls for whatever runs in fp32
        self.raw_model = build_model(args, ckpt, where)
        self.raw_model.gradient_checkpointing = args.gradient_checkpointing
        self.optimizer = make_optimizer(self.raw_model, args, where)
        self.step, self.horizon, self.val_loss = 0, args.steps, None
        self.history = {"step": [], "loss": [], "val_step": [], "val_loss": []}
        if ckpt:
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.optimizer.param_groups[0]["weight_decay"] = args.weight_decay  # may be overridden
            if ckpt["data"] is not None:  # None: the data changed since (checkpoint.data_change)
                loader.load_state_dict(ckpt["data"])
            set_rng_state(ckpt["rng"])
            self.step, self.horizon, self.val_loss = ckpt["step"], ckpt["lr_horizon"], ckpt.get("val_loss")
            self.history = ckpt.get("history") or self.history
            self.load_scaler_state(ckpt.get("scaler"))
        self.loss = train_kernels.ChunkedLoss(self.raw_model)  # model(x, y)'s loss, without its logits
        n_params = sum(p.numel() for p in self.raw_model.parameters())
        self.compiled, self.compile_reason = devices.pick_compile(where.type, args.compile, n_params, self.horizon)
        self.wrap_model()
        if self.compiled:
            self.check_compiled()
        self.tokens_per_step = args.batch_size * args.seq_len * args.grad_accum * where.world
        self.flops_per_token = flops_per_token(self.raw_model.config, args.seq_len, n_params)
        self.peak_flops = args.peak_flops or (devices.peak_flops(facts.name) if where.type == "cuda" else None)
        self.signal = None

    def wrap_model(self):
        """self.model, what train_step calls: the chunked loss, compiled or not, under DDP or not."""
        where = self.where
        self.model = torch.compile(self.loss) if self.compiled else self.loss
        if where.world > 1:
            # broadcast_buffers=False: the only buffers are the RoPE tables, equal on every rank
            self.model = DDP(self.model, device_ids=[where.local_rank] if where.type == "cuda" else None,
                             broadcast_buffers=False)
        # bf16 on CPU, eager: a bf16 copy of the weights instead of autocast's casts at every use,
        # 583 -> 631 tokens/s for the 135M model on 2 Sapphire Rapids cores (train_kernels.py).
        self.low = None
        if train_kernels.use_weight_copy(where.type, self.dtype, self.compiled, self.args.gradient_checkpointing,
                                         where.world):
            self.model = self.low = train_kernels.LowPrecisionWeights(self.loss)

    def check_compiled(self):
        """Compile now, on a forward and backward of a batch of zeros (no step, no data read, the
        gradients dropped), so that a machine that cannot compile (no C++ compiler, say) says so
        before training: --compile auto then trains eagerly, --compile on stops with one line."""
        deterministic = torch.are_deterministic_algorithms_enabled()
        if self.where.type == "cpu":
            train_kernels.deterministic_cpu_compile()  # else a resume would drift from the run it continues
        B, T = self.args.batch_size, self.args.seq_len
        tokens = torch.zeros(B * T + 1, dtype=torch.long, device=self.where.device)
        x, y = tokens[:-1].view(B, T), tokens[1:].view(B, T)  # as the loaders' batches: no recompiling
        cuda = [self.where.device] if self.where.type == "cuda" else []
        try:
            with torch.random.fork_rng(cuda):  # the run's random state as it was
                with self.autocast:
                    loss = self.model(x, y)
                (loss if self.scaler is None else self.scaler.scale(loss)).backward()
        except Exception as e:  # Inductor's errors have no common base class
            if self.args.compile == "on":
                why = ": ".join([type(e).__name__] + str(e).strip().splitlines()[:1])
                raise UsageError(f"--compile on: torch.compile failed here ({why}); train with --compile off") from None
            self.compiled = False
            self.compile_reason = f"eager: torch.compile failed here ({type(e).__name__})"
            torch.use_deterministic_algorithms(deterministic)  # eager CPU training repeats without it
            self.wrap_model()
        finally:
            self.optimizer.zero_grad(set_to_none=True)

    def train_step(self):
        """One optimizer step over grad_accum micro-batches; returns (mean loss, grad norm) tensors."""
        args, model = self.args, self.model
        loss_sum = torch.zeros((), device=self.where.device)
        for micro in range(args.grad_accum):
            x, y = (t.to(self.where.device, non_blocking=True) for t in self.loader.next_batch())
            if self.where.world > 1:  # all-reduce the gradients only in the last backward
                model.require_backward_grad_sync = micro == args.grad_accum - 1
            with self.autocast if self.low is None else contextlib.nullcontext():
                loss = model(x, y)  # the chunked loss: no (B, T, V) logits
            loss = loss / args.grad_accum  # the sum over micro-steps is the mean over the batch
            loss_sum += loss.detach()
            (loss if self.scaler is None else self.scaler.scale(loss)).backward()
            if self.low is not None:
                self.low.accumulate_grads()  # into the fp32 masters' .grad
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
        norm = torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), args.grad_clip or math.inf)
        if self.scaler is None:
            self.optimizer.step()
        else:  # GradScaler skips the step when a gradient holds an inf or nan, and so the norm does
            # (an fp32 norm of finite gradients would overflow only near 1e19)
            self.pending_skips += ~torch.isfinite(norm)  # counted on the device: no host sync per step
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.low is not None:
            self.low.refresh()
        return loss_sum, norm  # this rank's loss: averaged over the ranks at log steps only

    def skipped_steps(self):
        """Steps skipped by GradScaler for inf/nan gradients so far (a host sync: log steps, saves)."""
        self.skipped += int(self.pending_skips.item())
        self.pending_skips.zero_()
        return self.skipped

    def scaler_state(self):
        """The checkpoint's "scaler": the dtype trained in, skipped steps and GradScaler's state (fp16)."""
        return {"dtype": self.dtype, "skipped_steps": self.skipped_steps(),
                "state": self.scaler.state_dict() if self.scaler is not None else None}

    def load_scaler_state(self, saved):
        if not saved:
            return
        self.skipped = saved.get("skipped_steps", 0)
        if saved.get("dtype") != self.dtype:
            self.dtype_notice = (f"resuming a {saved.get('dtype')} run in {self.dtype}"
                                 + (": its GradScaler state is dropped" if saved.get("state") else "")
                                 + ("; a new GradScaler starts" if self.scaler is not None else ""))
        elif self.scaler is not None and saved.get("state"):
            self.scaler.load_state_dict(saved["state"])  # scale and growth tracker: resume bit for bit

    @torch.no_grad()
    def evaluate(self):
        """Mean loss over the first eval_iters batches of the validation split: the same batches
        every time and under any world size (rank r takes batches r, r + world, ...)."""
        loader = data.DataLoaderLite(self.val, self.args.batch_size, self.args.seq_len)
        n = min(self.args.eval_iters, loader.batches_per_epoch)
        total = torch.zeros((), device=self.where.device)
        self.raw_model.eval()  # uncompiled, unwrapped: no recompilation, no gradient hooks
        for i in range(n):
            x, y = (t.to(self.where.device) for t in loader.next_batch())
            if i % self.where.world == self.where.rank:
                with self.autocast:
                    total += self.loss(x, y)
        self.raw_model.train()
        self.val_loss = self.where.all_sum(total).item() / n
        return self.val_loss

    def sample(self):
        tok = data.load_tokenizer()
        prompt = tok.encode(self.args.sample_prompt).ids or [data.EOT_ID]
        gen = torch.Generator(self.where.device).manual_seed(self.args.seed)  # leaves global RNG alone
        self.raw_model.eval()
        ids = self.raw_model.generate(prompt, self.args.sample_tokens, temperature=0.8, top_k=50, generator=gen)
        self.raw_model.train()
        print(f"sample: {self.args.sample_prompt + tok.decode(ids)!r}", flush=True)

    def on_signal(self, signum, frame):
        if self.signal == signum:  # the same signal twice (Ctrl-C Ctrl-C): stop now, no save
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        self.signal = signum
        if self.where.master:
            print(f"\n{signal.Signals(signum).name}: finishing this step, then saving a checkpoint "
                  "(send it again to stop at once)", file=sys.stderr, flush=True)

    def should_stop(self, sync):
        """Whether a signal asks every rank to stop now. Across ranks that is an all-reduce and a host
        sync, so only at the steps given as `sync` (log steps, the same on every rank)."""
        if self.where.world == 1:
            return self.signal is not None
        if not sync:
            return False
        flag = torch.tensor(float(self.signal is not None), device=self.where.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # every rank stops at the same step
        return bool(flag.item())


def check_finite(run, loss, step):
    """fp16: a non-finite loss is an overflow that GradScaler handles (it skips the step and halves the
    scale), until the scale has fallen below 1: then no scale helps, the run has diverged."""
    if not math.isfinite(loss) and (run.scaler is None or run.scaler.get_scale() < 1):
        raise SystemExit(f"loss is {loss} at step {step}: training diverged; lower --lr or raise --warmup")


def train(run, saver):
    """The loop; returns the exit status: 0, or 128 + the signal that stopped it."""
    args, master = run.args, run.where.master
    if run.step == 0 and run.val is not None:
        run.history["val_step"].append(0)
        run.history["val_loss"].append(run.evaluate())
        if master:
            print(f"step 0 | val loss {run.val_loss:.4f}", flush=True)
    clock = loggers.Clock(run.step)
    while run.step < args.steps:
        lr = get_lr(run.step, args.lr, args.min_lr, args.warmup, run.horizon)
        for group in run.optimizer.param_groups:
            group["lr"] = lr
        loss, norm = run.train_step()
        run.step += 1
        step, last = run.step, run.step == args.steps
        evaluating = run.val is not None and (step % args.eval_interval == 0 or last)
        stop = run.should_stop(sync=step % args.log_interval == 0 or last or evaluating)
        val = None
        if evaluating:
            with clock.pause():
                val = run.evaluate()
        if step % args.log_interval == 0 or last or stop or evaluating:
            loss = run.where.all_sum(loss) / run.where.world  # on every rank: an all-reduce
            if master:
                check_finite(run, loggers.log_step(run, step, loss, norm, lr, val, clock), step)
            clock = loggers.Clock(step)
        with clock.pause():
            if master and args.sample_interval and step % args.sample_interval == 0:
                run.sample()
            if master and val is not None:
                saver.keep_best(run, step, val)
            if master and args.ckpt_interval and step % args.ckpt_interval == 0:
                saver.periodic(run, step)
        if stop and not last:
            return 128 + (run.signal or signal.SIGTERM)
    return 0


def main(argv=None):
    args = build_parser(__doc__.split("\n")[0]).parse_args(argv)
    if args.export or args.push_to_hub:
        import export  # export.py: GGUF files, HF directories with a model card, hub uploads
        if not args.export:
            raise UsageError("--push-to-hub uploads an export: give --export SRC OUT with it")
        try:
            return export.export(*args.export, args.dtype, args.push_to_hub)
        except export.ExportError as e:
            raise UsageError(str(e)) from None
    where = Dist(args.device)
    if args.ckpt == "auto":
        ckpt = resume_latest(args, where)
        if ckpt and ckpt["step"] >= args.steps:
            print(f"--ckpt auto: {args.ckpt} is at step {ckpt['step']} already (--steps {args.steps}): "
                  "nothing to train")
            return 0
    else:
        ckpt = load_checkpoint(args.ckpt) if args.ckpt else None
    check_args(args, ckpt)
    changed = resolve_args(args, ckpt["args"] if ckpt else None, where.world)
    check_writable(args.save, args.metrics, args.plot)
    try:  # a missing tracker package stops the run here, before anything heavy
        trackers = loggers.Loggers(args, ckpt["step"] if ckpt else 0, where.master)
    except loggers.MissingPackage as e:
        raise UsageError(str(e)) from None
    where.start()
    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        tokens, loader, val = load_data(args, where)  # DataError: before anything heavy is built
        fingerprint = data.fingerprint(args.data, column=args.text_column)
        if ckpt and (notice := data_change(ckpt, fingerprint, args.data)) and where.master:
            print(notice, file=sys.stderr, flush=True)
        if where.type == "cpu":
            train_kernels.keep_freed_memory()
        run = Run(args, ckpt, where, loader, val)
        run.data_fingerprint, saver = fingerprint, Saver(args, args.ckpt, ckpt)
        run.trackers = trackers
        del ckpt
        check_disk_space(args.save, run.raw_model, run.optimizer)  # before hours of training, not after
        if where.master:
            if changed:
                print(f"resuming with changed settings: {', '.join(f'{k}={getattr(args, k)}' for k in changed)}")
            describe(run, tokens, where)
        for signum in handlers:
            signal.signal(signum, run.on_signal)
        status = train(run, saver)
        if where.master:
            if not saver.final(run, run.step):
                return 1
            print(f"saved {args.save} at step {run.step}; loss curve {args.plot}", flush=True)
            if status:
                launcher = f"torchrun --nproc_per_node={where.world}" if where.world > 1 else "python"
                print(f"stopped by {signal.Signals(status - 128).name}; resume with:\n  "
                      f"{launcher} train.py --steps {args.steps} --ckpt {args.save}", flush=True)
        return status
    finally:
        trackers.close()
        for signum, handler in handlers.items():  # theirs again, and run can be freed
            signal.signal(signum, handler)


def resume_latest(args, where):
    """--ckpt auto: the newest checkpoint beside --save that loads (args.ckpt becomes its path), or
    None for a new run. The same command line, re-run after a crash, so continues the run."""
    save = args.save or DEFAULTS["save"]
    args.ckpt, ckpt = find_latest(save, say=where.master)
    if where.master:
        print(f"--ckpt auto: resuming from {args.ckpt} at step {ckpt['step']}" if ckpt else
              f"--ckpt auto: no checkpoint at {save} or beside it: starting a new run", flush=True)
    if ckpt:
        args.init = None  # the checkpoint already holds the weights --init started the run from
    return ckpt


if __name__ == "__main__":
    try:
        code = main()
    except (UsageError, CheckpointError, data.DataError, ModelLoadError) as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("train.py: interrupted before training started; nothing saved", file=sys.stderr)
        code = 130
    exit_process(code)
