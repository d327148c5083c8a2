"""Optional experiment trackers for train.py: TensorBoard (--tensorboard DIR) and Weights & Biases
(--wandb PROJECT). Each logged step's record (loss, lr, grad_norm, tok_s, val_loss, peak memory,
whatever train.py puts in it) goes to every tracker asked for, on rank 0 only. Neither package is
imported unless asked for; a missing one stops the run before training with what to pip install.
"""
import math
import os

# record key -> scalar tag; any other numeric key is logged as train/<key>
TAGS = {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm",
        "tok_s": "train/tokens_per_s", "val_loss": "val/loss"}


class MissingPackage(ValueError):
    """A tracker was asked for but its package is not installed (one line, exit status 2)."""


def _require(module, flag, package):
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingPackage(f"{flag} needs the {package} package: pip install {package}") from None


class Loggers:
    """The trackers of one run: log(record) after every logged step, close() at the end."""

    def __init__(self, args, resume_step=0, master=True):
        self.writers, self.wandb_run = [], None
        if not master:
            return
        if args.tensorboard:
            tensorboard = _require("torch.utils.tensorboard", "--tensorboard", "tensorboard")
            # on resume, drop events past the checkpoint's step: they belong to a run never resumed
            self.writers.append(tensorboard.SummaryWriter(args.tensorboard,
                                                          purge_step=resume_step + 1 if resume_step else None))
        if args.wandb:
            wandb = _require("wandb", "--wandb", "wandb")  # WANDB_MODE=offline / disabled are honoured
            self.wandb_run = wandb.init(project=args.wandb, config={k: v for k, v in vars(args).items()
                                                                     if isinstance(v, (int, float, str, bool))},
                                        dir=os.path.dirname(os.path.abspath(args.save)),
                                        name=os.path.splitext(os.path.basename(args.save))[0]
                                        + (f"-from-{resume_step}" if resume_step else ""))

    def log(self, record):
        step = record["step"]
        scalars = {TAGS.get(k, f"train/{k}"): float(v) for k, v in record.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
                   and math.isfinite(v)}
        for writer in self.writers:
            for tag, value in scalars.items():
                writer.add_scalar(tag, value, step)
            writer.flush()  # a killed run keeps its curve up to the last logged step
        if self.wandb_run is not None:
            self.wandb_run.log(scalars, step=step)

    def close(self):
        for writer in self.writers:
            writer.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
        self.writers, self.wandb_run = [], None
