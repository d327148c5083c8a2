"""Checkpoints: what a training run saves, where it goes, and how it survives crashes and full disks.
This module is the one door to them, both layouts (the file, and under --fsdp the sharded folder):
load_checkpoint, save_checkpoint (through Saver), find_latest and restore pick the layout. The folder's
own layout is sharded_checkpoint.py's, which only weights.py also reads (to gather the weights).

A checkpoint is one torch.save'd dict of tensors and plain Python values (it loads with
weights_only=True): format_version, model, config, step, val_loss, optimizer, lr_horizon, data (the
loader's position), data_fingerprint (the token cache's key: which data that position is in), rng,
args, history (the loss curve so far), best (the step and validation loss of the best one) and scaler
(the dtype trained in, the steps skipped for overflow, fp16's GradScaler state). Every file
is written to a temporary file beside it, fsynced, then renamed over the old one, so a crash at any
moment leaves the previous one whole. Under --fsdp the same entries less model and optimizer go in a
sharded folder's train_state.pt, beside each rank's shards of those two.

Beside --save DIR/NAME.pt go files named after the run (run_file), so that two runs in one folder
never touch each other's: NAME_step_N.pt (every --ckpt-interval steps, the newest --keep-last kept),
NAME_best.pt (the lowest validation loss so far, the same format), and loggers.py's loss curve
NAME_loss.png and NAME_metrics.jsonl; the default run, checkpoint.pt, keeps the older names best.pt,
loss.png and metrics.jsonl. A final save at the step best was just written at is a hard link to it,
not a second copy. `--ckpt auto` resumes from the newest of the run's own checkpoints that loads. A
save that fails (full disk, I/O error, permissions) is one line naming the file, the error and the
last good checkpoint, never a traceback: training goes on and the next interval tries again; only a
failed final save ends the run with an error.
"""
import codecs
import contextlib
import os
import random
import re
import shutil
import sys
from dataclasses import asdict

import numpy as np
import torch

from model import SmolLM2Config
from smollm2 import cpu_paths, sharded_checkpoint
from smollm2.errors import CheckpointError, reason
from smollm2.files import atomic_link, atomic_write, existing_folder

FORMAT_VERSION = 1  # bump when older code would misread a new checkpoint; version-less ones are 0
CKPT_KEYS = ("model", "config", "step", "optimizer", "lr_horizon", "data", "rng", "args")
MB = 1e6
DEFAULT_RUN = "checkpoint"  # the default --save's name: its files keep the names they had before run names
SIDE_FILES = {"best": "best.pt", "plot": "loss.png", "metrics": "metrics.jsonl"}


def run_name(save):
    """NAME of --save NAME.pt: what the files a run writes beside its --save are named after."""
    return os.path.splitext(os.path.basename(save))[0]


def run_file(save, kind, step=None):
    """The file of `kind` (best, plot, metrics, or periodic at `step`) of the run saving to --save
    DIR/NAME.pt: DIR/NAME_best.pt, NAME_loss.png, NAME_metrics.jsonl, NAME_step_N.pt, so that two
    runs in one folder never write each other's files. The default run, checkpoint.pt, keeps the
    names of runs before run names (best.pt, loss.png, metrics.jsonl): existing folders stay valid."""
    folder, name = os.path.dirname(save), run_name(save)
    if kind == "periodic":
        return os.path.join(folder, f"{name}_step_{step}.pt")
    return os.path.join(folder, SIDE_FILES[kind] if name == DEFAULT_RUN else f"{name}_{SIDE_FILES[kind]}")


def periodic_steps(save, names):
    """{step: file name} of the run's own periodic checkpoints among names (a folder's listing)."""
    pattern = re.compile(re.escape(run_name(save)) + r"_step_(\d+)\.pt")
    return {int(m[1]): m[0] for m in map(pattern.fullmatch, names) if m}


def resume_names(save):
    """The files find_latest (`--ckpt auto`) looks for beside --save, for messages: checkpoint.pt,
    best.pt, checkpoint_step_N.pt (or NAME.pt, NAME_best.pt, NAME_step_N.pt)."""
    return [os.path.basename(p) for p in (save, run_file(save, "best"), run_file(save, "periodic", "N"))]


def load_checkpoint(path, flag="--ckpt"):
    """The checkpoint at path, checked to be a training checkpoint this code can resume. A sharded
    one (a folder, sharded_checkpoint.py) gives its train state, with "sharded": path and no model or
    optimizer (restore loads them into the sharded model)."""
    if sharded_checkpoint.is_sharded(path):
        return load_sharded_state(path, flag)
    if os.path.isdir(path):
        raise CheckpointError(f"{flag} {path}: a folder, not a checkpoint file; to start a new run "
                              "from an HF model directory use --init")
    if not os.path.isfile(path):
        raise CheckpointError(f"{flag} {path}: no such file{same_step_elsewhere(path)}")
    kind = file_kind(path)
    if kind in ("GGUF", "safetensors"):
        raise CheckpointError(f"{flag} {path}: not a training checkpoint but model weights (a {kind} file); "
                              f"to start a new run from them use --init {path}")
    if kind:
        raise CheckpointError(f"{flag} {path}: not a checkpoint ({kind}); resume from a checkpoint.pt "
                              "that train.py saved, or start from weights with --init")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"{flag} {path}: not a readable checkpoint, truncated or corrupt "
                              f"({reason(e)})") from None
    missing = [k for k in CKPT_KEYS if k not in ckpt] if isinstance(ckpt, dict) else list(CKPT_KEYS)
    if missing:
        raise CheckpointError(f"{flag} {path}: not a training checkpoint (no {', '.join(missing)}); "
                              "to start a new run from a weights-only file use --init")
    version = ckpt.get("format_version", 0)
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(f"{flag} {path}: checkpoint format {version} is newer than this code's "
                              f"{FORMAT_VERSION}: resume it with the version of train.py that wrote it")
    try:
        SmolLM2Config(**ckpt["config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{flag} {path}: bad model config ({e})") from None
    return ckpt


def load_sharded_state(path, flag):
    try:
        ckpt = sharded_checkpoint.load_train_state(path)
    except Exception as e:
        raise CheckpointError(f"{flag} {path}: a sharded checkpoint without a readable "
                              f"{sharded_checkpoint.TRAIN_STATE} ({reason(e)})") from None
    ckpt = {**ckpt, "model": None, "optimizer": None, "sharded": path}
    missing = [k for k in CKPT_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"{flag} {path}: not a sharded training checkpoint (no {', '.join(missing)})")
    return ckpt


def same_step_elsewhere(path):
    """For a missing NAME_step_N.pt: the periodic checkpoints of step N beside it under other run
    names (periodic checkpoints are named after their run's --save), as a hint; else ""."""
    m = re.fullmatch(r"(.+)_step_(\d+)\.pt", os.path.basename(path))
    folder = os.path.dirname(path)
    if not m or not os.path.isdir(folder or "."):
        return ""
    found = sorted(n for n in os.listdir(folder or ".") if n.endswith(f"_step_{m[2]}.pt"))
    return (f" (step {m[2]} here: {', '.join(found)}; periodic checkpoints are named after their run's "
            "--save)") if found else ""


def file_kind(path):
    """What the file at path is when it cannot be a torch checkpoint: GGUF, safetensors, "a text
    file", "an empty file", "a binary file of unknown format ..."; None when it starts as torch.save's
    files do (a zip, or a pickle in the legacy format), so that a failed load means damage."""
    with open(path, "rb") as f:
        head, size = f.read(4096), os.fstat(f.fileno()).st_size
    if head.startswith(b"PK") or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")):
        return None
    if head.startswith(b"GGUF"):
        return "GGUF"
    header = int.from_bytes(head[:8], "little") if len(head) >= 8 else 0  # safetensors: its JSON's length
    if 0 < header <= size - 8 and head[8:9] == b"{":
        return "safetensors"
    if not head:
        return "an empty file"
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)  # a cut last character is fine
        if b"\0" not in head:
            return "a text file"
    except UnicodeDecodeError:
        pass
    return "a binary file of unknown format (damaged, or not written by train.py)"


def rng_state():
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [name, keys.tolist(), pos, has_gauss, gauss]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    if torch.cuda.is_available() and len(state.get("cuda", [])) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path, run, step, best=None):
    """One file (rank 0 writes it), or under --fsdp a sharded folder (every rank writes its shards)."""
    state = {"format_version": FORMAT_VERSION, "config": asdict(run.model.config), "step": step,
             "val_loss": run.val_loss, "lr_horizon": run.horizon, "data": run.loader.state_dict(),
             "data_fingerprint": getattr(run, "data_fingerprint", None), "rng": rng_state(),
             "args": vars(run.args), "history": run.history, "best": best, "scaler": run.precision.state_dict(),
             "cpu_paths": cpu_paths.record(getattr(run, "cpu_paths", None))}
    if run.sharded:
        sharded_checkpoint.save_sharded(path, run.model, run.optimizer, state, run.proc)
        return
    ckpt = {**state, "model": run.model.state_dict(), "optimizer": run.optimizer.state_dict()}
    atomic_write(path, lambda f: torch.save(ckpt, f))


def restore(ckpt, model, optimizer):
    """Load a loaded checkpoint's AdamW state into optimizer and, from a sharded one, its weights into
    model, already fully_shard'ed (DCP reshards what another number of ranks wrote; collective). A
    checkpoint file's weights, ckpt["model"], load before that: into the model as it is built."""
    if ckpt.get("sharded"):
        sharded_checkpoint.load_sharded(ckpt["sharded"], model, optimizer)
    else:
        optimizer.load_state_dict(ckpt["optimizer"])


def remove(path):
    """Delete a checkpoint, a file or a sharded folder."""
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    else:
        os.remove(path)


# ----------------------------------------------------------------------------- resuming
def find_latest(save, say=True):
    """(path, checkpoint) for `--ckpt auto`: the newest by step among save and the run's own best
    and periodic checkpoints beside it (run_file: another run name's are not this run's) that loads
    (one that does not is skipped with a notice), or (None, None) when there is none."""
    folder = os.path.dirname(save)
    names = os.listdir(folder or ".") if os.path.isdir(folder or ".") else []
    if say and names:  # one process cleans up (rank 0 under torchrun); the others skip those names anyway
        _remove_stale_temps(folder, names, say, save)
        names = os.listdir(folder or ".")
    periodic = sorted(periodic_steps(save, names).items(), reverse=True)
    found, newest = (None, None), -1
    best = os.path.basename(run_file(save, "best"))
    for name in (os.path.basename(save), best):  # their steps are only known once loaded
        path = os.path.join(folder, name)
        ckpt = _try_load(path, say) if name in names else None
        if ckpt and ckpt["step"] > newest:
            found, newest = (path, ckpt), ckpt["step"]
    for step, name in periodic:
        if step <= newest:  # loading is slow: stop at the first one not newer than what we have
            break
        path = os.path.join(folder, name)
        if ckpt := _try_load(path, say):
            return path, ckpt
    return found


def _remove_stale_temps(folder, names, say, save):
    """Temporary files (and sharded folders) of the run's saves that a crash cut short (their process
    is gone): up to a checkpoint each, and nothing can finish them. A sharded checkpoint moved aside
    for its successor (.NAME.PID.old) goes back to its name if the successor never took it. Another
    run name's are left to that run."""
    own = {os.path.basename(save)} | {os.path.basename(run_file(save, kind)) for kind in SIDE_FILES}
    stale = []
    for name in sorted(names):
        m = re.fullmatch(r"\.(.+)\.(\d+)\.(tmp|old)", name)  # .{target}.{pid}.tmp: atomic_write's, the folders'
        if m and (m[1] in own or periodic_steps(save, [m[1]])) and int(m[2]) != os.getpid():
            try:
                os.kill(int(m[2]), 0)
            except ProcessLookupError:
                stale.append((name, m[1], m[3]))
            except OSError:  # PermissionError: another user's live process
                pass
    removed = []
    for name, target, kind in stale:
        path = os.path.join(folder, name)
        with contextlib.suppress(OSError):
            if kind == "old" and not os.path.lexists(os.path.join(folder, target)):
                os.rename(path, os.path.join(folder, target))
                continue
            remove(path)
            removed.append(name)
    if removed and say:
        print(f"train.py: --ckpt auto: removed {len(removed)} temporary file(s) of interrupted saves: "
              f"{', '.join(removed)}", file=sys.stderr, flush=True)


def _try_load(path, say):
    try:
        return load_checkpoint(path, flag="--ckpt auto: skipping")
    except CheckpointError as e:
        if say:
            print(f"train.py: {e}", file=sys.stderr, flush=True)
        return None


def data_change(ckpt, fingerprint, spec):
    """The notice to print when the checkpoint was trained on other data than spec (then its loader
    position means nothing here: resume at the start of the new data), else None."""
    saved = ckpt.get("data_fingerprint")
    if saved is None or saved == fingerprint:  # checkpoints before fingerprints: trust them
        return None
    ckpt["data"] = None  # the loader keeps its start
    return (f"train.py: the data changed since the checkpoint ({spec} is {fingerprint}, the checkpoint "
            f"was trained on {saved}): the loader starts at the beginning of the new data (exact "
            "resume needs the same data)")


# ----------------------------------------------------------------------------- disk space
def checkpoint_bytes(model, optimizer):
    """About the size of a checkpoint: the model's and optimizer's tensor bytes (before the first
    step AdamW has no state yet: count its two moments per parameter), plus a margin for the rest."""
    storages = {}
    def add(t):
        s = t.untyped_storage()
        storages[(s.device, s.data_ptr())] = s.nbytes()  # tied weights are saved once
    for t in model.state_dict().values():
        add(t)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for p in params:
        state = optimizer.state.get(p)
        if state:
            for t in state.values():
                if torch.is_tensor(t):
                    add(t)
    fresh = sum(2 * p.nbytes for p in params if not optimizer.state.get(p))
    return sum(storages.values()) + fresh + int(1 * MB) + len(params) * 4096  # pickle, records


def check_disk_space(save, model, optimizer):
    """Refuse to start when --save's folder cannot hold a checkpoint and its temporary copy (the
    previous checkpoint stays until the new one is whole). Returns the estimated checkpoint size."""
    sharded = hasattr(next(model.parameters()), "full_tensor")  # a DTensor: fully_shard'ed
    size = (sharded_checkpoint.checkpoint_bytes if sharded else checkpoint_bytes)(model, optimizer)
    folder = existing_folder(save)
    held = min(os.path.getsize(save), size) if os.path.isfile(save) else 0  # already on the disk
    need, free = 2 * size - held, shutil.disk_usage(folder).free
    if free < need:
        raise CheckpointError(f"not enough disk space for checkpoints in {folder}: {free / MB:,.1f} MB free, "
                              f"{need / MB:,.1f} MB needed (a checkpoint of about {size / MB:,.1f} MB plus "
                              "its temporary copy while it is written); free some space or choose another --save")
    return size


# ----------------------------------------------------------------------------- saving
class Saver:
    """Writes a run's checkpoints (named after it: run_file), remembers the last good one and the
    best checkpoint's step, and reports a failed save in one line instead of raising (its temporary
    file is already gone by then)."""

    def __init__(self, args, resumed_from=None, ckpt=None, master=True):
        """master: this process prints (under --fsdp every rank saves, rank 0 alone speaks)."""
        self.args, self.folder, self.master = args, os.path.dirname(args.save), master
        self.best_path = run_file(args.save, "best")
        self.last_good = (resumed_from, ckpt["step"]) if ckpt else None  # good until a save succeeds
        self.best = ckpt.get("best") if ckpt else None  # {"step", "val_loss"} of best_path
        self.best_written = None  # the step at which this process wrote best_path: --save may link to it
        self.final_note = ""  # how final() saved, for the run's last line

    def _write(self, path, run, step):
        """Save; returns None, or the line saying why the save failed."""
        try:
            save_checkpoint(path, run, step, self.best)
        except (OSError, RuntimeError) as e:  # a full disk in torch's zip writer is a RuntimeError
            free = shutil.disk_usage(existing_folder(path)).free / MB
            good = f"{self.last_good[0]} (step {self.last_good[1]})" if self.last_good else "none yet"
            return (f"could not save {path} at step {step} ({reason(e)}; {free:,.1f} MB "
                    f"free); the last good checkpoint is {good}")
        self.last_good = (path, step)
        return None

    def periodic(self, run, step):
        """NAME_step_{step}.pt beside --save NAME.pt; keep the newest --keep-last of the earlier ones."""
        failed = self._write(run_file(self.args.save, "periodic", step), run, step)
        if failed:
            retry = step + self.args.ckpt_interval
            if self.master:
                print(f"train.py: warning: {failed}; training goes on"
                      + (f", the next try is at step {retry}" if retry <= self.args.steps else ""),
                      file=sys.stderr, flush=True)
            return
        if (keep := self.args.keep_last) and self.master:
            found = periodic_steps(self.args.save, os.listdir(self.folder or "."))  # this run's only
            older = sorted(n for n in found if n < step)  # later: an abandoned run
            for n in older[:max(0, len(older) - (keep - 1))]:
                with contextlib.suppress(OSError):  # one left over is no reason to stop training
                    remove(os.path.join(self.folder, found[n]))

    def keep_best(self, run, step, val_loss):
        """best_path (best.pt, NAME_best.pt) when val_loss is the lowest so far."""
        if self.best and not val_loss < self.best["val_loss"]:
            return
        before, self.best = self.best, {"step": step, "val_loss": val_loss}
        failed = self._write(self.best_path, run, step)
        if failed:
            self.best = before  # best_path still holds that one
            if self.master:
                print(f"train.py: warning: {failed}; training goes on", file=sys.stderr, flush=True)
        else:
            self.best_written = step
            if self.master:
                print(f"best: {self.best_path} at step {step}, val loss {val_loss:.4f}", flush=True)

    def final(self, run, step):
        """--save at the end of the run; False (after the one line) when it could not be written.
        When best_path was written at this very step (by this process: nothing changed since),
        --save is a hard link to it rather than a second copy of the same bytes (1.6 GB at 135M);
        where the filesystem cannot link, a save like any other."""
        if self.best_written == step and not run.sharded and atomic_link(self.best_path, self.args.save):
            self.last_good = (self.args.save, step)
            self.final_note = f" (a hard link to {self.best_path}, the same checkpoint)"
            return True
        failed = self._write(self.args.save, run, step)
        if failed and self.master:
            print(f"train.py: error: {failed}", file=sys.stderr, flush=True)
        return not failed
