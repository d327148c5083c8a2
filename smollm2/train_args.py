"""train.py's settings: one dataclass, Settings, is every setting's default, its --help and what a
checkpoint saves (its "args"); the parser is built from it; how a resumed run fills the settings it
was not given from its checkpoint (resolve_args); the checks that refuse an impossible request before
anything heavy is built (check_args).
"""
import argparse
import os
from dataclasses import asdict, dataclass, field, fields

from model import PRESETS, SmolLM2Config
from smollm2 import devices, optim
from smollm2.checkpoint import run_file
from smollm2.cli import NONNEG_FLOAT, NONNEG_INT, POS_FLOAT, POS_INT, OneLineParser
from smollm2.errors import ModelLoadError, UsageError
from smollm2.weights import read_config_json

# what makes two models the same model: a checkpoint resumes only under a --model that matches these
ARCH = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads")


def setting(default, help, resumed=True, **argparse_kw):
    """A Settings field. resumed: on resume, the checkpoint's value unless given on the command line
    (else: this launch's alone, as --steps and --device). argparse_kw: add_argument's type, choices,
    metavar..."""
    return field(default=default, metadata=dict(help=help, resumed=resumed, **argparse_kw))


@dataclass
class Settings:
    steps: int = setting(5000, "total optimizer steps to reach; on resume it counts the steps already done",
                         resumed=False, type=POS_INT)
    ckpt: str = setting(None, "resume from this checkpoint; auto = the newest one beside --save, or a new run "
                        "if there is none", resumed=False, metavar="PATH")
    init: str = setting(None, "start a new run from pretrained weights: an HF model directory, a .safetensors, "
                        ".gguf or checkpoint file, or a hub id", resumed=False, metavar="SOURCE")
    data: str = setting("input.txt", "training data: a text, .parquet, .jsonl or .jsonl.gz file, a directory or "
                        "glob of them, or hf:NAME[:CONFIG] (or hf:./folder of parquet/JSONL shards) streamed with "
                        "datasets")
    text_column: str = setting("text", "the text column (parquet) or field (JSONL, hf:) of each document",
                               metavar="NAME")
    val_data: str = setting(None, "validation data, any --data kind; None = held out of --data (--val-frac of "
                            "files, --val-tokens of a stream)", metavar="SOURCE")
    val_tokens: int = setting(100_000, "validation tokens of an hf: stream: its first N, held out of training; "
                              "0 = none", type=NONNEG_INT)
    model: str = setting("smollm2-135m", f"model preset ({', '.join(sorted(PRESETS))}) or the path of an HF "
                         "config.json of a Llama-shaped model of any size, trained from scratch with that shape",
                         metavar="PRESET|CONFIG.JSON")
    batch_size: int = setting(4, "sequences per micro-batch per process; the default suits a CPU: on a GPU "
                              "raise it and --seq-len (docs/gpu.md)", type=POS_INT)
    seq_len: int = setting(256, "tokens per sequence", type=POS_INT)
    grad_accum: int = setting(1, "micro-batches per optimizer step", type=POS_INT)
    optimizer: str = setting("adamw", "adamw, or muon: Muon for the decoder layers' matrices, AdamW for the "
                             "embedding and norms, at AdamW's --lr scale and --weight-decay (docs/training.md)",
                             choices=optim.OPTIMIZERS)
    lr: float = setting(None, f"peak learning rate (default {optim.DEFAULT_LR['adamw']:g} with adamw, "
                        f"{optim.DEFAULT_LR['muon']:g} with muon)", type=POS_FLOAT)
    min_lr: float = setting(3e-5, "final learning rate, at the end of the cosine or the wsd decay",
                            type=NONNEG_FLOAT)
    warmup: int = setting(100, "linear warmup steps", type=NONNEG_INT)
    schedule: str = setting("cosine", "LR after the warmup: cosine down to --min-lr, or wsd (warmup-stable-decay, "
                            "SmolLM2's): flat, then a decay over the last --decay-frac of the steps",
                            choices=optim.SCHEDULES)
    decay_frac: float = setting(0.2, "wsd: the fraction of the steps that decays", type=POS_FLOAT)
    decay_shape: str = setting("linear", "wsd: the decay's shape, linear (SmolLM2's) or 1-sqrt",
                               choices=optim.DECAY_SHAPES)
    weight_decay: float = setting(0.1, "decoupled weight decay on matrices (AdamW's and Muon's)",
                                  type=NONNEG_FLOAT)
    grad_clip: float = setting(1.0, "clip the gradient norm to this; 0 = no clipping", type=NONNEG_FLOAT)
    seed: int = setting(1337, "random seed", type=int)
    device: str = setting("auto", "auto picks cuda, then mps, then cpu", resumed=False)
    dtype: str = setting("auto", "fp32, bf16 autocast or fp16 autocast with a GradScaler; auto = bf16 where it "
                         "is native (CUDA compute capability >= 8.0, CPUs with amx_bf16/avx512_bf16), fp16 on older "
                         "GPUs, else fp32", choices=list(devices.DTYPES))
    compile: str = setting("auto", "torch.compile the model: on (--compile alone), off, or auto = on for CPU runs "
                           "of >= 500 steps of >= 100M-parameter models", nargs="?", const="on",
                           choices=devices.COMPILE)
    fsdp: bool = setting(False, "under torchrun: shard the weights, gradients and AdamW state over the processes "
                         "(FSDP2) and write sharded checkpoints (folders, one shard per process), for models that "
                         "do not fit one device with DDP (docs/distributed.md)", resumed=False, action="store_true")
    gradient_checkpointing: bool = setting(False, "recompute each decoder layer in backward: less activation "
                                           "memory, about a third more compute", resumed=False,
                                           action="store_true")
    deterministic: bool = setting(False, "deterministic kernels (torch.use_deterministic_algorithms; slower on a "
                                  "GPU), so that a resumed GPU run repeats the uninterrupted one bit for bit on the "
                                  "same GPUs and torch. CPU runs repeat bit for bit without it; GPU runs without it "
                                  "resume equal to within the order of floating-point sums (flash attention's and "
                                  "Inductor's atomic adds)", action="store_const", const=True)
    peak_flops: float = setting(None, "one device's peak FLOP/s (a GPU's; a CPU's counts the whole machine) for "
                                "MFU in the log, on any device (default: a table of GPUs)", resumed=False,
                                type=POS_FLOAT)
    val_frac: float = setting(0.05, "held-out tail of file data for validation; 0 = none", type=NONNEG_FLOAT)
    eval_interval: int = setting(250, "steps between validation losses", type=POS_INT)
    eval_iters: int = setting(20, "batches per validation loss", type=POS_INT)
    eval_tasks: str = setting(None, "zero-shot tasks scored at every evaluation step, logged as acc_<task>: a "
                              "comma list of NAME[:ROWS] (arc_easy, arc_challenge, piqa, openbook_qa, lambada_openai, "
                              "core = all five; a JSONL path in llm-foundry's layout), e.g. arc_easy:500,piqa:500 "
                              "(default none)", metavar="TASKS")
    log_interval: int = setting(10, "steps between log lines and metrics records", type=POS_INT)
    save: str = setting("checkpoint.pt", "final checkpoint (also written on SIGINT/SIGTERM)", metavar="PATH")
    ckpt_interval: int = setting(1000, "steps between NAME_step_N.pt beside --save NAME.pt; 0 = none",
                                 type=NONNEG_INT)
    keep_last: int = setting(2, "periodic checkpoints to keep; 0 = all", type=NONNEG_INT)
    metrics: str = setting(None, "JSONL file of logged steps (default NAME_metrics.jsonl beside --save NAME.pt; "
                           "metrics.jsonl for checkpoint.pt)", metavar="PATH")
    plot: str = setting(None, "loss-curve PNG (default NAME_loss.png beside --save NAME.pt; loss.png for "
                        "checkpoint.pt)", metavar="PATH")
    tensorboard: str = setting(None, "also log to TensorBoard in this directory (pip install tensorboard)",
                               resumed=False, metavar="DIR")
    wandb: str = setting(None, "also log to this Weights & Biases project; honours WANDB_MODE=offline (pip "
                         "install wandb)", resumed=False, metavar="PROJECT")
    sample_interval: int = setting(500, "steps between printed samples; 0 = none", type=NONNEG_INT)
    sample_prompt: str = setting("The", "prompt of the samples")
    sample_tokens: int = setting(48, "tokens per sample", type=POS_INT)
    world_size: int = setting(1, None, resumed=False)  # processes: set by resolve_args, not a flag


RESUMED = [f.name for f in fields(Settings) if f.metadata["resumed"]]
DEFAULTS = {name: Settings.__dataclass_fields__[name].default for name in RESUMED}

EXAMPLES = """examples:
  python train.py --steps 5000                        # SmolLM2-135M from scratch on input.txt
  python train.py --steps 5050 --ckpt checkpoint.pt   # resume: 50 more steps, bit for bit (GPU: --deterministic)
  python train.py --steps 5000 --ckpt auto            # the newest checkpoint beside --save, or a new run
  python train.py --model tiny --steps 500 --batch-size 8 --seq-len 128 --lr 3e-3 --min-lr 3e-4 \\
    --warmup 50 --save runs/tiny/checkpoint.pt        # the tiny preset: about 2 minutes on a CPU

Exporting a checkpoint is export.py's. Run-defining settings not given on resume are taken from the checkpoint."""


def build_parser(description=None):
    """The command line of Settings: each field a flag with its help and "(default ...)"; the resumed
    ones parse to None where not given (resolve_args fills them)."""
    # RawDescriptionHelpFormatter: the examples' lines stay as written (the flags' help is still wrapped)
    p = OneLineParser(description=description, epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(Settings):
        kw = {k: v for k, v in f.metadata.items() if k not in ("help", "resumed")}
        if f.metadata["help"] is None:
            continue
        help = f.metadata["help"] + ("" if "(default" in f.metadata["help"] or f.default in (None, False)
                                     else f" (default {f.default})")
        if kw.get("type") in (POS_INT, NONNEG_INT, POS_FLOAT, NONNEG_FLOAT):
            kw.setdefault("metavar", "N" if kw["type"] in (POS_INT, NONNEG_INT) else "X")
        default = None if f.metadata["resumed"] else f.default
        p.add_argument("--" + f.name.replace("_", "-"), help=help, default=default, **kw)
    for flag in ("--export", "--push-to-hub"):  # moved to export.py: they answer with its command
        p.add_argument(flag, nargs="*", help=argparse.SUPPRESS)
    return p


def resolve_args(args, saved, world):
    """(Settings, the settings given on the command line that differ from the checkpoint's): args as
    parsed, the unset ones filled from the checkpoint's run (if any), then from the defaults."""
    given = {k for k in DEFAULTS if getattr(args, k) is not None}
    for k, default in DEFAULTS.items():
        if k not in given:
            setattr(args, k, saved.get(k, default) if saved else default)
    if args.lr is None:  # neither given nor saved: the optimizer's default
        args.lr = optim.DEFAULT_LR[args.optimizer]
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
    changed = sorted(k for k in given if saved and k in saved and saved[k] != getattr(args, k))
    return Settings(**{f.name: getattr(args, f.name) for f in fields(Settings)}), changed


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
    check_optimizer(args, ckpt)
    if args.decay_frac is not None and args.decay_frac > 1:
        raise UsageError(f"--decay-frac {args.decay_frac:g}: the fraction of the steps that decays is at most 1")
    if ckpt and args.model is not None:
        problems = config_mismatch(ckpt["config"], asdict(model_config(args.model)))
        if problems:
            raise UsageError(f"--ckpt {args.ckpt} holds a different model than --model {args.model} "
                             f"({problems}); drop --model to resume it as it is")
    if args.init and not ckpt:
        return  # the source's context window is checked once it is loaded
    config = SmolLM2Config(**ckpt["config"]) if ckpt else model_config(args.model or DEFAULTS["model"])
    if (args.seq_len or 0) > config.max_position_embeddings:
        raise UsageError(f"--seq-len {args.seq_len} exceeds the model's context window of "
                         f"{config.max_position_embeddings}")


def check_optimizer(args, ckpt):
    """A run keeps its optimizer (its state is the optimizer's own); --fsdp trains with AdamW only."""
    saved = ckpt["args"].get("optimizer", "adamw") if ckpt else None  # checkpoints before --optimizer: AdamW
    if saved and args.optimizer and args.optimizer != saved:
        raise UsageError(f"--ckpt {args.ckpt} was trained with --optimizer {saved}, and its state is {saved}'s: "
                         f"resume it with --optimizer {saved} (or without --optimizer), or start a new run with "
                         f"--init {args.ckpt} --optimizer {args.optimizer}")
    if args.fsdp and (args.optimizer or saved) == "muon":
        raise UsageError("--fsdp --optimizer muon: Muon orthogonalises whole matrices and --fsdp gives each "
                         "process a shard of each; train Muon runs with DDP (torchrun without --fsdp)")


def model_config(name):
    """The SmolLM2Config of --model: a preset's, or an HF Llama config.json's (one line when it is neither,
    or a config this model cannot be)."""
    if name in PRESETS:
        return PRESETS[name]
    if not name.endswith(".json") and not os.path.isfile(name):
        raise UsageError(f"--model {name}: not a preset ({', '.join(sorted(PRESETS))}) nor an HF config.json file")
    try:
        fields_ = read_config_json(name, PRESETS[DEFAULTS["model"]].vocab_size)
        return SmolLM2Config(**{f.name: fields_[f.name] for f in fields(SmolLM2Config) if f.name in fields_})
    except (TypeError, ValueError) as e:  # ModelLoadError is a ValueError too: one line either way
        raise UsageError(f"--model {e}" if isinstance(e, ModelLoadError) else f"--model {name}: bad config ({e})") \
            from None


def config_mismatch(have, want):
    return ", ".join(f"{k} {have.get(k)} vs {want[k]}" for k in ARCH if have.get(k) != want[k])
