"""train.py's command line: every setting with its default, its parser, how a resumed run fills the
settings it was not given from its checkpoint (resolve_args), and the checks that refuse an
impossible request before anything heavy is built (check_args).
"""
import argparse
from dataclasses import asdict

from model import PRESETS, SmolLM2Config
from smollm2 import devices
from smollm2.checkpoint import run_file
from smollm2.cli import NONNEG_FLOAT, NONNEG_INT, POS_FLOAT, POS_INT, OneLineParser
from smollm2.errors import UsageError

# what makes two models the same model: a checkpoint resumes only under a --model that matches these
ARCH = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads")

# Defaults. On resume, a setting not given on the command line comes from the checkpoint's run.
DEFAULTS = dict(data="input.txt", model="smollm2-135m", batch_size=4, seq_len=256, grad_accum=1,
                lr=3e-4, min_lr=3e-5, warmup=100, weight_decay=0.1, grad_clip=1.0, seed=1337,
                dtype="auto", val_frac=0.05, eval_interval=250, eval_iters=20, log_interval=10,
                save="checkpoint.pt", ckpt_interval=1000, keep_last=2, metrics=None, plot=None,  # None: beside --save
                sample_interval=500, sample_prompt="The", sample_tokens=48, compile="auto",
                deterministic=False, eval_tasks=None, text_column="text", val_data=None, val_tokens=100_000)  # the last three: loaders.py


EXAMPLES = """examples:
  python train.py --steps 5000                        # SmolLM2-135M from scratch on input.txt
  python train.py --steps 5050 --ckpt checkpoint.pt   # resume: 50 more steps, bit for bit (GPU: --deterministic)
  python train.py --steps 5000 --ckpt auto            # the newest checkpoint beside --save, or a new run
  python train.py --model tiny --steps 500 --batch-size 8 --seq-len 128 --lr 3e-3 --min-lr 3e-4 \\
    --warmup 50 --save runs/tiny/checkpoint.pt        # the tiny preset: about 2 minutes on a CPU

Run-defining settings not given on resume are taken from the checkpoint."""


def build_parser(description=None):
    # RawDescriptionHelpFormatter: the examples' lines stay as written (the flags' help is still wrapped)
    p = OneLineParser(description=description, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    def add(flag, help, **kw):
        name = flag[2:].replace("-", "_")
        if name in DEFAULTS and "(default" not in help:
            help += f" (default {DEFAULTS[name]})"
        if kw.get("type") in (POS_INT, NONNEG_INT, POS_FLOAT, NONNEG_FLOAT):
            kw.setdefault("metavar", "N" if kw["type"] in (POS_INT, NONNEG_INT) else "X")
        p.add_argument(flag, help=help, **kw)
    add("--steps", "total optimizer steps to reach; on resume it counts the steps already done "
        "(default 5000)", type=POS_INT, default=5000)
    add("--ckpt", "resume from this checkpoint; auto = the newest one beside --save, or a new run "
        "if there is none", metavar="PATH")
    add("--init", "start a new run from pretrained weights: an HF model directory, a .safetensors, "
        ".gguf or checkpoint file, or a hub id", metavar="SOURCE")
    add("--export", "write CKPT (or any --init source) as an HF-format directory OUT (with a model "
        "card), or as one GGUF file if OUT ends in .gguf, then exit", nargs=2, metavar=("CKPT", "OUT"))
    add("--push-to-hub", "with --export: upload OUT to this Hugging Face hub repo", metavar="REPO_ID")
    add("--data", "training data: a text, .parquet, .jsonl or .jsonl.gz file, a directory or glob "
        "of them, or hf:NAME[:CONFIG] (or hf:./folder of parquet/JSONL shards) streamed with datasets")
    add("--text-column", "the text column (parquet) or field (JSONL, hf:) of each document",
        metavar="NAME")
    add("--val-data", "validation data, any --data kind; None = held out of --data (--val-frac of "
        "files, --val-tokens of a stream)", metavar="SOURCE")
    add("--val-tokens", "validation tokens of an hf: stream: its first N, held out of training; "
        "0 = none", type=NONNEG_INT)
    add("--model", "model preset", choices=sorted(PRESETS))
    add("--batch-size", "sequences per micro-batch per process; the default suits a CPU: on a GPU raise it "
        "and --seq-len (docs/gpu.md)", type=POS_INT)
    add("--seq-len", "tokens per sequence", type=POS_INT)
    add("--grad-accum", "micro-batches per optimizer step", type=POS_INT)
    add("--lr", "peak learning rate", type=POS_FLOAT)
    add("--min-lr", "final learning rate of the cosine decay", type=NONNEG_FLOAT)
    add("--warmup", "linear warmup steps", type=NONNEG_INT)
    add("--weight-decay", "AdamW weight decay on matrices", type=NONNEG_FLOAT)
    add("--grad-clip", "clip the gradient norm to this; 0 = no clipping", type=NONNEG_FLOAT)
    add("--seed", "random seed", type=int)
    add("--device", "auto picks cuda, then mps, then cpu", default="auto")
    add("--dtype", "fp32, bf16 autocast or fp16 autocast with a GradScaler; auto = bf16 where it is "
        "native (CUDA compute capability >= 8.0, CPUs with amx_bf16/avx512_bf16), fp16 on older GPUs, "
        "else fp32 (for --export: bf16 unless fp32)", choices=list(devices.DTYPES))
    add("--compile", "torch.compile the model: on (--compile alone), off, or auto = on for CPU runs of "
        ">= 500 steps of >= 100M-parameter models", nargs="?", const="on", choices=devices.COMPILE)
    add("--fsdp", "under torchrun: shard the weights, gradients and AdamW state over the processes (FSDP2) "
        "and write sharded checkpoints (folders, one shard per process), for models that do not fit "
        "one device with DDP (docs/distributed.md)", action="store_true")
    add("--gradient-checkpointing", "recompute each decoder layer in backward: less activation memory, "
        "about a third more compute", action="store_true")
    add("--deterministic", "deterministic kernels (torch.use_deterministic_algorithms; slower on a GPU), so "
        "that a resumed GPU run repeats the uninterrupted one bit for bit on the same GPUs and torch. CPU runs "
        "repeat bit for bit without it; GPU runs without it resume equal to within the order of "
        "floating-point sums (flash attention's and Inductor's atomic adds)", action="store_const", const=True)
    add("--peak-flops", "one device's peak FLOP/s (a GPU's; a CPU's counts the whole machine) "
        "for MFU in the log, on any device (default: a table of GPUs)", type=POS_FLOAT)
    add("--val-frac", "held-out tail of file data for validation; 0 = none", type=NONNEG_FLOAT)
    add("--eval-interval", "steps between validation losses", type=POS_INT)
    add("--eval-iters", "batches per validation loss", type=POS_INT)
    add("--eval-tasks", "zero-shot tasks scored at every evaluation step, logged as acc_<task>: a comma list "
        "of NAME[:ROWS] (arc_easy, arc_challenge, piqa, openbook_qa, lambada_openai, core = all five; "
        "a JSONL path in llm-foundry's layout), e.g. arc_easy:500,piqa:500 (default none)", metavar="TASKS")
    add("--log-interval", "steps between log lines and metrics records", type=POS_INT)
    add("--save", "final checkpoint (also written on SIGINT/SIGTERM)", metavar="PATH")
    add("--ckpt-interval", "steps between NAME_step_N.pt beside --save NAME.pt; 0 = none", type=NONNEG_INT)
    add("--keep-last", "periodic checkpoints to keep; 0 = all", type=NONNEG_INT)
    add("--metrics", "JSONL file of logged steps (default NAME_metrics.jsonl beside --save NAME.pt; "
        "metrics.jsonl for checkpoint.pt)", metavar="PATH")
    add("--plot", "loss-curve PNG (default NAME_loss.png beside --save NAME.pt; loss.png for "
        "checkpoint.pt)", metavar="PATH")
    add("--tensorboard", "also log to TensorBoard in this directory (pip install tensorboard)", metavar="DIR")
    add("--wandb", "also log to this Weights & Biases project; honours WANDB_MODE=offline (pip install "
        "wandb)", metavar="PROJECT")
    add("--sample-interval", "steps between printed samples; 0 = none", type=NONNEG_INT)
    add("--sample-prompt", "prompt of the samples")
    add("--sample-tokens", "tokens per sample", type=POS_INT)
    return p


def resolve_args(args, saved, world):
    """Fill unset settings from the checkpoint's run (if any), then from DEFAULTS. Returns the
    settings given on the command line that differ from the checkpoint's."""
    given = {k for k in DEFAULTS if getattr(args, k) is not None}
    for k, default in DEFAULTS.items():
        if k not in given:
            setattr(args, k, saved.get(k, default) if saved else default)
    if isinstance(args.compile, bool):  # a checkpoint from before --compile auto: the flag was on or off
        args.compile = "on" if args.compile else "off"
    if saved and "grad_accum" not in given:  # keep the global batch under a new world size
        total = saved["grad_accum"] * saved.get("world_size", 1)
        args.grad_accum = total // world if total % world == 0 else args.grad_accum
    for k in ("metrics", "plot"):  # named after the checkpoint's --save: resumed into another, follow it
        if saved and saved.get("save") and getattr(args, k) == run_file(saved["save"], k):
            setattr(args, k, None)
    args.plot = args.plot or run_file(args.save, "plot")
    args.metrics = args.metrics or run_file(args.save, "metrics")  # the checkpoint keeps it: resume appends
    args.world_size = world
    return sorted(k for k in given if saved and k in saved and saved[k] != getattr(args, k))


def check_args(args, ckpt):
    """Refuse impossible requests before anything heavy is built."""
    if ckpt and args.init:
        raise UsageError("--init starts a new run from pretrained weights and --ckpt resumes one: use one")
    if ckpt and ckpt.get("sharded") and not args.fsdp:
        raise UsageError(f"--ckpt {args.ckpt}: a sharded checkpoint (a folder of shards written under --fsdp); "
                         "resume it under torchrun with --fsdp, or gather its weights with export.py or --init")
    if ckpt and args.fsdp and not ckpt.get("sharded"):
        raise UsageError(f"--ckpt {args.ckpt}: a single-file checkpoint, and --fsdp resumes sharded ones "
                         f"(folders); resume it without --fsdp, or start a sharded run from its weights "
                         f"with --init {args.ckpt}")
    if ckpt and args.steps <= ckpt["step"]:
        raise UsageError(f"--steps {args.steps} is not above the checkpoint's step {ckpt['step']}: "
                         f"nothing to train; e.g. --steps {ckpt['step'] + 50} trains 50 more")
    if ckpt and args.model is not None:
        problems = config_mismatch(ckpt["config"], asdict(PRESETS[args.model]))
        if problems:
            raise UsageError(f"--ckpt {args.ckpt} holds a different model than --model {args.model} "
                             f"({problems}); drop --model to resume it as it is")
    if args.init and not ckpt:
        return  # the source's context window is checked once it is loaded
    config = SmolLM2Config(**ckpt["config"]) if ckpt else PRESETS[args.model or DEFAULTS["model"]]
    if (args.seq_len or 0) > config.max_position_embeddings:
        raise UsageError(f"--seq-len {args.seq_len} exceeds the model's context window of "
                         f"{config.max_position_embeddings}")


def config_mismatch(have, want):
    return ", ".join(f"{k} {have.get(k)} vs {want[k]}" for k in ARCH if have.get(k) != want[k])
