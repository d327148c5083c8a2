"""Train SmolLM2 from scratch or fine-tune it, nanoGPT-style, with exact resume and atomic checkpoints.

    python train.py --steps 5000                             # train on input.txt -> checkpoint.pt
    python train.py --steps 5050 --ckpt checkpoint.pt        # 50 more steps, as if never stopped
    python train.py --steps 5000 --ckpt auto                 # resume from the newest checkpoint, if any
    torchrun --nproc_per_node=8 train.py --steps 5000        # DDP: nccl on GPUs, gloo on CPU
    python train.py --init model.gguf --steps 200 --lr 1e-4  # fine-tune from real SmolLM2 weights

Read it top to bottom: the settings (smollm2/train_args.py), the set-up (model, speed-ups, optimizer,
the loss a micro-step calls), then the loop: forward, backward, clip, step, zero_grad, and every so
often evaluate, log and save. A checkpoint (smollm2/checkpoint.py) holds everything a resume needs
(the model, optimizer, step, LR horizon, the loader's position, every RNG state, the settings and the
precision's state), written atomically; exporting a checkpoint is export.py's.
"""
import contextlib
import math
import signal
import sys

import torch

from model import SmolLM2, SmolLM2Config, flops_per_token
from smollm2 import cpu_paths, devices, loggers, optim, report, sharding, speedups, zero_shot
from smollm2.checkpoint import Saver, check_disk_space, find_latest, load_checkpoint, restore, set_rng_state
from smollm2.chunked_loss import ChunkedLoss
from smollm2.cli import main_guard
from smollm2.data import load_data
from smollm2.distributed import Process, exit_process
from smollm2.errors import UsageError
from smollm2.files import check_writable
from smollm2.loss_eval import validation_loss
from smollm2.precision import Precision
from smollm2.run_lock import RunLock
from smollm2.sampling import sample_text
from smollm2.signals import StopSignals
from smollm2.tokenizer import load_tokenizer
from smollm2.train_args import DEFAULTS, build_parser, check_args, model_config, resolve_args
from smollm2.training_loss import TrainingLoss


# ----------------------------------------------------------------------------- settings
def settings(args, proc):
    """(Settings, the checkpoint to resume or None, the settings changed from it, whether --ckpt auto
    starts a new run) from the parsed command line; Settings None when --ckpt auto finds the run
    finished. Every impossible request is one line here, before anything heavy."""
    if args.export is not None or args.push_to_hub is not None:
        raise UsageError("exporting moved to export.py: python export.py CKPT OUT [--push-to-hub REPO_ID]")
    auto = args.ckpt == "auto"
    if auto:  # the newest checkpoint beside --save, or a new run
        args.ckpt, ckpt = find_latest(args.save or DEFAULTS["save"], say=proc.master)
        if ckpt and proc.master:
            print(f"--ckpt auto: resuming from {args.ckpt} at step {ckpt['step']}", flush=True)
        if ckpt and ckpt["step"] >= args.steps:
            print(f"--ckpt auto: {args.ckpt} is at step {ckpt['step']} already (--steps {args.steps}): "
                  "nothing to train")
            return None, None, None, False
        args.init = None if ckpt else args.init  # the checkpoint holds the weights --init started from
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
    args, changed = resolve_args(args, ckpt["args"] if ckpt else None, proc.world)
    return args, ckpt, changed, auto and ckpt is None


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
        model = SmolLM2(model_config(args.model))  # a preset, or the shape of a config.json
    model.gradient_checkpointing = args.gradient_checkpointing
    return model.to(proc.device).train()


class Run:
    """The model, optimizer, data and loop state of a training run: everything a checkpoint holds."""

    def __init__(self, args, ckpt, proc, data, tasks=()):
        self.args, self.proc, self.loader, self.val = args, proc, data.loader, data.val
        self.data_fingerprint = data.fingerprint
        facts = devices.device_facts(proc.device)
        self.precision = Precision(facts, sharding.fsdp_dtype(facts, args.dtype) if args.fsdp else args.dtype,
                                   proc.device)
        if proc.type == "cuda":
            torch.set_float32_matmul_precision("high")  # TF32 matmuls for whatever runs in fp32
        self.model = build_model(args, ckpt, proc)  # the SmolLM2 itself: what checkpoints save
        n_params = sum(p.numel() for p in self.model.parameters())
        self.step, self.val_loss = 0, None
        self.horizon, self.horizon_moved = optim.lr_horizon(args, ckpt)  # where the LR schedule ends
        compile_choice = devices.pick_compile(proc.type, args.compile, n_params, self.horizon)  # (on?, why)
        # fp32 on CPU: MKL or oneDNN for the products, whichever measured faster here (smollm2/cpu_paths.py)
        self.cpu_paths = cpu_paths.for_run(self.model.config, args.batch_size * args.seq_len, self.precision.dtype,
                                           proc, ckpt and ckpt.get("cpu_paths"))
        self.speedups = speedups.install(self.model, proc.device, self.precision.dtype, compile_choice[0],
                                         training=True, sharded=args.fsdp,  # before DDP or FSDP wrap it
                                         gemm=self.cpu_paths["route"] if self.cpu_paths else "mkl")
        self.sharded = None  # --fsdp: the sharded root, the chunked loss around the model (sharding.py)
        if args.fsdp:
            self.sharded = sharding.shard(ChunkedLoss(self.model), self.model, proc, self.precision.dtype)
        # AdamW, or Muon for the decoder's matrices and AdamW for the rest (--optimizer; smollm2/optim.py)
        self.optimizer = optim.make_optimizer(self.model, args, fused=proc.type in ("cuda", "cpu"))
        self.history = {"step": [], "loss": [], "val_step": [], "val_loss": []}
        if ckpt:
            self.restore(ckpt)
        # what a micro-step calls: the chunked loss, compiled or not, under DDP, FSDP or neither
        self.loss = TrainingLoss(self.model, proc, self.precision, args.compile, compile_choice,
                                 args.gradient_checkpointing, args.batch_size * args.seq_len, self.sharded,
                                 args.grad_accum, self.optimizer)
        self.loss.probe(args.batch_size, args.seq_len)
        self.tokens_per_step = args.batch_size * args.seq_len * args.grad_accum * proc.world
        self.flops_per_token = flops_per_token(self.model.config, args.seq_len, n_params)
        self.peak_flops = args.peak_flops or (devices.peak_flops(facts.name) if proc.type == "cuda" else None)
        self.tasks = list(tasks)  # --eval-tasks: zero-shot tasks scored at evaluation steps
        self.tokenizer = load_tokenizer() if self.tasks else None

    def restore(self, ckpt):
        """Every state of the checkpoint's run: weights (sharded ones), optimizer, data position, RNG, loop."""
        restore(ckpt, self.model, self.optimizer)  # the optimizer's state; a sharded checkpoint's weights too
        optim.set_weight_decay(self.optimizer, self.args.weight_decay)  # may be overridden
        if ckpt["data"] is not None:  # None: the data changed since (data.change_since)
            self.loader.load_state_dict(ckpt["data"])
        set_rng_state(ckpt["rng"])
        self.step, self.val_loss = ckpt["step"], ckpt.get("val_loss")
        self.history = ckpt.get("history") or self.history
        self.precision.load_state_dict(ckpt.get("scaler"))

    def train_step(self):
        """One optimizer step over grad_accum micro-batches; returns (mean loss, grad norm) tensors."""
        args, precision = self.args, self.precision
        loss_sum = torch.zeros((), device=self.proc.device)
        for _ in range(args.grad_accum):
            batch = [devices.to_device(t, self.proc.device) for t in self.loader.next_batch()]  # x, y[, doc]
            loss = self.loss(*batch) / args.grad_accum  # the sum over micro-steps is the mean over the batch
            loss_sum += loss.detach()
            precision.backward(loss)
        precision.unscale(self.optimizer)
        norm = sharding.full_norm(torch.nn.utils.clip_grad_norm_(self.model.parameters(), args.grad_clip or math.inf))
        precision.step(self.optimizer, norm)
        self.optimizer.zero_grad(set_to_none=True)
        return loss_sum, norm  # this rank's loss: averaged over the ranks at log steps only

    def evaluate(self):
        """(validation loss or None, {task: accuracy} or None) in the run's precision."""
        if self.val is not None:
            self.val_loss = validation_loss(self.loss.chunked, self.val, self.args.batch_size, self.args.seq_len,
                                            self.args.eval_iters, self.proc, self.precision.autocast,
                                            lockstep=self.sharded is not None)
        return (self.val_loss if self.val is not None else None), (self.score_tasks() if self.tasks else None)

    def score_tasks(self):
        """{task: accuracy} of --eval-tasks in the run's precision, each rank scoring its share of the
        rows (FSDP: with every weight gathered); the training's random state and mode untouched."""
        dtype = self.precision.dtype if self.sharded is None else "fp32"  # FSDP: bf16 weights already
        gathered = sharding.gathered(self.sharded, self.model) if self.sharded is not None else contextlib.nullcontext()
        with gathered:
            return {task.name: zero_shot.score_task(self.model, self.tokenizer, task, self.proc.device, dtype,
                                                    self.proc)["accuracy"] for task in self.tasks}

    def sample(self):
        text = sample_text(self.model, self.args.sample_prompt, self.args.sample_tokens, self.args.seed)
        print(f"sample: {text!r}", flush=True)


# ----------------------------------------------------------------------------- the loop
def train(run, saver, stop):
    """The loop; returns the exit status: 0, or 128 + the signal that stopped it."""
    args, master = run.args, run.proc.master
    if run.step == 0 and (run.val is not None or run.tasks):  # where the curves start
        loggers.record_start(run.history, *run.evaluate(), master)
    clock = loggers.Clock(run.step, run.proc.device)
    while run.step < args.steps:
        lr = optim.lr_at(run.step, args, run.horizon)  # --schedule cosine or wsd
        optim.set_lr(run.optimizer, lr, run.step)  # and Muon's momentum warm-up
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
                val, accuracies = run.evaluate()
        if step % args.log_interval == 0 or last or stopping or evaluating:
            loss = run.proc.all_sum(loss) / run.proc.world  # on every rank: an all-reduce
            if master:
                loss = loggers.log_step(run, step, loss, norm, lr, val, clock, accuracies)
                if run.precision.diverged(loss):
                    raise SystemExit(f"loss is {loss} at step {step}: training diverged; lower --lr or raise --warmup")
            clock = loggers.Clock(step, run.proc.device)
        saves = master or run.sharded is not None  # under --fsdp every rank writes its shards
        sampling = master and args.sample_interval and step % args.sample_interval == 0 and not hurry and not args.fsdp
        if sampling or (saves and (val is not None or periodic)):  # a GPU's clock waits for the device
            with clock.pause():  # only here: other steps queue work while the host prepares the next
                if sampling:
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
    proc = Process(args.device)
    args, ckpt, changed, new_run = settings(args, proc)
    if args is None:
        return 0
    if args.deterministic:  # before anything runs on the device (cuBLAS reads its setting once)
        devices.deterministic_mode(proc.type)
    check_writable(args.save, args.metrics, args.plot)
    tasks = ([zero_shot.load_task(name, None, rows) for name, rows in zero_shot.parse_tasks(args.eval_tasks)]
             if args.eval_tasks else [])  # a bad task name or file: one line, before anything heavy
    lock = RunLock(args.save) if proc.master else None  # a second run on this --save stops here
    trackers = None
    new_run = new_run and proc.master  # --ckpt auto found nothing: rank 0 says what starts
    try:
        if new_run and not args.init:  # a preset's size is known before anything is built
            with torch.device("meta"):  # no memory, no time
                print(report.new_run_notice(args, proc, SmolLM2(model_config(args.model))), flush=True)
        # a missing tracker package stops the run here (MissingPackage), before anything heavy
        trackers = loggers.Loggers(args, ckpt["step"] if ckpt else 0, proc.master)
        proc.start()
        data = load_data(args, proc)  # DataError: before anything heavy is built
        if ckpt and (notice := data.change_since(ckpt)) and proc.master:
            print(notice, file=sys.stderr, flush=True)
        run = Run(args, ckpt, proc, data, tasks)
        if new_run and args.init:  # the --init source's size is known once it is loaded
            print(report.new_run_notice(args, proc, run.model), flush=True)
        run.trackers = trackers
        saver = Saver(args, args.ckpt, ckpt, master=proc.master)
        del ckpt
        check_disk_space(args.save, run.model, run.optimizer)  # before hours of training, not after
        if proc.master:
            if changed:
                print(f"resuming with changed settings: {', '.join(f'{k}={getattr(args, k)}' for k in changed)}")
            report.describe(run, data)
        with StopSignals(proc, saved=lambda: report.saved_so_far(saver, args, proc)) as stop:
            status = train(run, saver, stop)
            if (run.sharded is not None or proc.master) and not saver.final(run, run.step):
                return 1
            if proc.master:
                print(report.finished(args, proc, run.step, saver, status), flush=True)
        return status
    finally:
        if trackers is not None:
            trackers.close()
        if lock is not None:
            lock.release()


if __name__ == "__main__":
    main_guard(main, "train.py", exit=exit_process,
               interrupted="interrupted before training started; nothing saved")
