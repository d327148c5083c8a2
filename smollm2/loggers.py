"""What a training run records at each logged step, on rank 0 only: the console's step line,
metrics.jsonl (one JSON record a step), the loss curve (--plot, a PNG redrawn at every evaluation and
when the run ends), and the optional trackers, TensorBoard (--tensorboard DIR) and Weights &
Biases (--wandb PROJECT). A record holds loss, lr, grad_norm, tok_s, val_loss, peak memory, whatever
log_step puts in it. Neither tracker package is imported unless asked for; a missing one stops the
run before training with what to pip install.
"""
import contextlib
import json
import math
import os
import sys
import time

from smollm2 import devices
from smollm2.errors import MissingPackage
from smollm2.files import atomic_write

# record key -> scalar tag; any other numeric key is logged as train/<key>
TAGS = {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm",
        "tok_s": "train/tokens_per_s", "val_loss": "val/loss"}


def _require(module, flag, package):
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MissingPackage(f"{flag} needs the {package} package: pip install {package}") from None


def _step(line):
    """The step of one metrics.jsonl line; infinity for a line that is not a record (a torn write)."""
    with contextlib.suppress(ValueError, AttributeError):
        return json.loads(line).get("step", math.inf)
    return math.inf


class MetricsFile:
    """metrics.jsonl, a line a record, flushed at once. Opened at the first record: on resume it keeps
    the records up to the checkpoint's step (later ones belong to a run that was never resumed). A
    write that fails (a full disk) is one warning line and training goes on: what is lost is the
    records, never the run (the checkpoints report their own failures)."""

    def __init__(self, path, resume_step):
        self.path, self.resume_step, self.file, self.failed = path, resume_step, None, False

    def _open(self):
        if self.resume_step and os.path.exists(self.path):
            with open(self.path) as f:
                lines = f.readlines()
            kept = [line.rstrip("\n") + "\n" for line in lines if _step(line) <= self.resume_step]
            if kept != lines:  # a temp file renamed over it: a full disk cannot cost the records kept
                atomic_write(self.path, lambda f: f.writelines(line.encode() for line in kept))
            return open(self.path, "a")
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        return open(self.path, "w")

    def write(self, record):
        try:
            if self.file is None:
                self.file = self._open()
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()  # a killed run keeps its records up to the last logged step
        except OSError as e:
            if not self.failed:
                print(f"train.py: warning: could not write {self.path} at step {record['step']} "
                      f"({e.strerror or e}): training goes on, without the records it cannot write",
                      file=sys.stderr, flush=True)
            self.failed = True

    def close(self):
        if self.file is not None:
            with contextlib.suppress(OSError):  # its failure was said already
                self.file.close()


class LossCurve:
    """The --plot PNG, redrawn from the run's history (the checkpoint's curves) when log gets an
    evaluation (a new validation or --eval-tasks point) or the run's last step, and by close() when
    steps were logged since (a run stopped early), so that it always ends at the last logged step. A
    drawing that fails is a warning: training goes on."""

    def __init__(self, path, last_step):
        self.path, self.last_step, self.history, self.drawn = path, last_step, None, True

    def log(self, record, history):
        self.history, self.drawn = history, False
        if record["step"] >= self.last_step or any(k == "val_loss" or k.startswith("acc_") for k in record):
            self.draw()

    def draw(self):
        self.drawn = True
        try:
            plot_loss(self.history, self.path)
        except (OSError, RuntimeError) as e:
            print(f"train.py: warning: could not draw the loss curve {self.path} ({e})", file=sys.stderr)

    def close(self):
        if not self.drawn:
            self.draw()


class Loggers:
    """metrics.jsonl, the loss curve and the trackers of one run: log(record, history) after every
    logged step, close() at the end."""

    def __init__(self, args, resume_step=0, master=True):
        self.writers, self.wandb_run, self.metrics, self.curve = [], None, None, None
        if not master:
            return
        self.metrics = MetricsFile(args.metrics, resume_step)
        self.curve = LossCurve(args.plot, args.steps)
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

    def log(self, record, history=None):
        """history: the run's curves so far (run.history), for the loss curve; without it none is drawn."""
        self.metrics.write(record)
        if history is not None:
            self.curve.log(record, history)
        step = record["step"]
        scalars = {TAGS.get(k, f"{'eval' if k.startswith('acc_') else 'train'}/{k}"): float(v) for k, v in record.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
                   and math.isfinite(v)}
        for writer in self.writers:
            for tag, value in scalars.items():
                writer.add_scalar(tag, value, step)
            writer.flush()  # a killed run keeps its curve up to the last logged step
        if self.wandb_run is not None:
            self.wandb_run.log(scalars, step=step)

    def close(self):
        if self.metrics is not None:
            self.metrics.close()
        if self.curve is not None:
            self.curve.close()
        for writer in self.writers:
            writer.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
        self.writers, self.wandb_run, self.metrics, self.curve = [], None, None, None


class Clock:
    """Seconds of training since the last log line, not counting evaluation, samples and saves. On a
    GPU the clock is read once the device has done the steps queued before the pause (devices.synchronize);
    else the pause would count their work as paused, overstating tokens/s and MFU."""

    def __init__(self, step, device="cpu"):
        self.start, self.step, self.paused, self.device = time.perf_counter(), step, 0.0, device

    @contextlib.contextmanager
    def pause(self):
        devices.synchronize(self.device)
        t = time.perf_counter()
        yield
        devices.synchronize(self.device)
        self.paused += time.perf_counter() - t

    def seconds_per_step(self, step):
        return (time.perf_counter() - self.start - self.paused) / max(step - self.step, 1)


def eta_text(seconds):
    """0h01m00s for 59.6 s: rounded once, then split (not 0h00m60s)."""
    hours, rest = divmod(round(seconds), 3600)
    return f"{hours}h{rest // 60:02d}m{rest % 60:02d}s"


def log_step(run, step, loss, norm, lr, val, clock, accuracies=None):
    """Log one step: its record to metrics.jsonl and the trackers, its line to stdout, its losses to
    run.history (the checkpoint's curves, the --plot drawn from them). accuracies: {task: accuracy}
    of --eval-tasks at an evaluation step, logged as acc_<task>. Returns the loss as a float."""
    loss, norm = loss.item(), float(norm)  # .item() waits for the device: the timing below is real
    per_step = clock.seconds_per_step(step)
    tok_s, eta = run.tokens_per_step / max(per_step, 1e-9), (run.args.steps - step) * per_step
    record = {"step": step, "loss": loss, "lr": lr, "grad_norm": norm, "tok_s": round(tok_s, 1)}  # exact floats
    extra = ""
    peak = devices.peak_memory(run.proc.device)
    if peak is not None:
        record["peak_mem_bytes"] = peak
        extra += f" | mem {peak / 2**30:.2f} GiB"
    if run.peak_flops:  # the GPU table's, or --peak-flops on any device
        record["mfu"] = devices.mfu(tok_s, run.flops_per_token, run.peak_flops, run.proc.type, run.proc.world)
        extra += f" | MFU {record['mfu']:.1%}"
    if run.precision.scaler is not None:
        record["skipped_steps"] = run.precision.skipped_steps()
        extra += f" | skipped {record['skipped_steps']}"
    run.history["step"].append(step)
    run.history["loss"].append(loss)
    if val is not None:
        record["val_loss"] = val
        run.history["val_step"].append(step)
        run.history["val_loss"].append(val)
    record.update({f"acc_{name}": accuracy for name, accuracy in (accuracies or {}).items()})
    record_tasks(run.history, step, accuracies)
    run.trackers.log(record, run.history)  # after the history: the loss curve may be redrawn from it
    width = len(str(run.args.steps))
    print(f"step {step:>{width}}/{run.args.steps} | loss {loss:.4f} | lr {lr:.2e} | grad {norm:.3f} | "
          f"{tok_s:,.0f} tok/s{extra} | ETA {eta_text(eta)}"
          + (f" | val loss {val:.4f}" if val is not None else "") + tasks_text(accuracies), flush=True)
    return loss


def record_start(history, val, accuracies, master):
    """Step 0's validation loss and --eval-tasks accuracies (None where not evaluated): where the curves
    start, in history and, on rank 0 (master), on the console."""
    if val is not None:
        history["val_step"].append(0)
        history["val_loss"].append(val)
        if master:
            print(f"step 0 | val loss {val:.4f}", flush=True)
    if accuracies:
        record_tasks(history, 0, accuracies)
        if master:
            print("step 0" + tasks_text(accuracies), flush=True)


def record_tasks(history, step, accuracies):
    """--eval-tasks' accuracies at step into history["tasks"] (the checkpoint's curves, the plot's panel)."""
    tasks = history.setdefault("tasks", {})
    for name, accuracy in (accuracies or {}).items():
        tasks.setdefault(name, []).append((step, accuracy))


def tasks_text(accuracies):
    """The log line's part for --eval-tasks: " | arc_easy 0.480 | piqa 0.650"."""
    return "".join(f" | {name} {a:.3f}" for name, a in (accuracies or {}).items())


def plot_loss(history, path):
    """The loss curve (train, validation) as a PNG; with --eval-tasks a second panel below it, each
    task's accuracy at the evaluation steps."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    tasks = history.get("tasks") or {}
    fig, axes = plt.subplots(2 if tasks else 1, 1, figsize=(8, 7.5 if tasks else 4.5), sharex=True, squeeze=False)
    ax = axes[0][0]
    ax.plot(history["step"], history["loss"], lw=1, label="train")
    if history["val_step"]:
        ax.plot(history["val_step"], history["val_loss"], "o-", ms=3, label="validation")
    ax.set(xlabel="step", ylabel="cross-entropy loss (nats/token)", title="SmolLM2 training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    if tasks:
        acc = axes[1][0]
        for name, points in tasks.items():
            acc.plot([p[0] for p in points], [p[1] for p in points], "o-", ms=3, label=name)
        acc.set(xlabel="step", ylabel="zero-shot accuracy", title="--eval-tasks")
        acc.grid(alpha=0.3)
        acc.legend(fontsize=8)
    try:
        atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    finally:
        plt.close(fig)
