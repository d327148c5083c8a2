"""Checkpoints: what a training run saves, where it goes, and how it survives crashes and full disks.

A checkpoint is one torch.save'd dict of tensors and plain Python values (it loads with
weights_only=True): format_version, model, config, step, val_loss, optimizer, lr_horizon, data (the
loader's position), data_fingerprint (the token cache's key: which data that position is in), rng,
args, history (the loss curve so far), best (the step and validation loss of best.pt) and scaler
(the dtype trained in, the steps skipped for overflow, fp16's GradScaler state). Every file
is written to a temporary file beside it, fsynced, then renamed over the old one, so a crash at any
moment leaves the previous one whole.

Beside --save go checkpoint_step_N.pt (every --ckpt-interval steps, the newest --keep-last kept),
best.pt (the lowest validation loss so far, the same format) and the loss curve. `--ckpt auto`
resumes from the newest of them that loads. A save that fails (full disk, I/O error, permissions) is
one line naming the file, the error and the last good checkpoint, never a traceback: training goes
on and the next interval tries again; only a failed final save ends the run with an error.
"""
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
from smollm2.errors import CheckpointError
from smollm2.files import atomic_write, existing_folder
from smollm2.loggers import plot_loss

FORMAT_VERSION = 1  # bump when older code would misread a new checkpoint; version-less ones are 0
CKPT_KEYS = ("model", "config", "step", "optimizer", "lr_horizon", "data", "rng", "args")
PERIODIC = re.compile(r"checkpoint_step_(\d+)\.pt")
BEST = "best.pt"
MB = 1e6


def load_checkpoint(path, flag="--ckpt"):
    """The checkpoint at path, checked to be a training checkpoint this code can resume."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{flag} {path}: no such file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        reason = str(e).strip().split("\n")[0][:120]
        raise CheckpointError(f"{flag} {path}: not a readable checkpoint, truncated or corrupt "
                              f"({type(e).__name__}: {reason})") from None
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
    ckpt = {"format_version": FORMAT_VERSION, "model": run.model.state_dict(),
            "config": asdict(run.model.config), "step": step, "val_loss": run.val_loss,
            "optimizer": run.optimizer.state_dict(), "lr_horizon": run.horizon,
            "data": run.loader.state_dict(), "data_fingerprint": getattr(run, "data_fingerprint", None),
            "rng": rng_state(), "args": vars(run.args), "history": run.history, "best": best,
            "scaler": run.precision.state_dict()}
    atomic_write(path, lambda f: torch.save(ckpt, f))


# ----------------------------------------------------------------------------- resuming
def find_latest(save, say=True):
    """(path, checkpoint) for `--ckpt auto`: the newest by step among save, best.pt and the
    checkpoint_step_N.pt beside it that loads (one that does not is skipped with a notice), or
    (None, None) when there is none."""
    folder = os.path.dirname(save)
    names = os.listdir(folder or ".") if os.path.isdir(folder or ".") else []
    _remove_stale_temps(folder, names, say)
    periodic = sorted(((int(m[1]), m[0]) for m in map(PERIODIC.fullmatch, names) if m), reverse=True)
    found, newest = (None, None), -1
    for name in (os.path.basename(save), BEST):  # their steps are only known once loaded
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


def _remove_stale_temps(folder, names, say):
    """Temporary files of saves that a crash cut short (their process is gone): up to a checkpoint
    each, and nothing can finish them."""
    stale = []
    for name in names:
        m = re.fullmatch(r"\..+\.(?:pt|png)\.(\d+)\.tmp", name)  # atomic_write's names
        if m and int(m[1]) != os.getpid():
            try:
                os.kill(int(m[1]), 0)
            except ProcessLookupError:
                stale.append(name)
            except OSError:  # PermissionError: another user's live process
                pass
    for name in stale:
        with contextlib.suppress(OSError):
            os.remove(os.path.join(folder, name))
    if stale and say:
        print(f"train.py: --ckpt auto: removed {len(stale)} temporary file(s) of interrupted saves: "
              f"{', '.join(stale)}", file=sys.stderr, flush=True)


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
    size, folder = checkpoint_bytes(model, optimizer), existing_folder(save)
    held = min(os.path.getsize(save), size) if os.path.isfile(save) else 0  # already on the disk
    need, free = 2 * size - held, shutil.disk_usage(folder).free
    if free < need:
        raise CheckpointError(f"not enough disk space for checkpoints in {folder}: {free / MB:,.1f} MB free, "
                              f"{need / MB:,.1f} MB needed (a checkpoint of about {size / MB:,.1f} MB plus "
                              "its temporary copy while it is written); free some space or choose another --save")
    return size


# ----------------------------------------------------------------------------- saving
class Saver:
    """Writes a run's checkpoints, remembers the last good one and best.pt's step, and reports a
    failed save in one line instead of raising (its temporary file is already gone by then)."""

    def __init__(self, args, resumed_from=None, ckpt=None):
        self.args, self.folder = args, os.path.dirname(args.save)
        self.best_path = os.path.join(self.folder, BEST)
        self.last_good = (resumed_from, ckpt["step"]) if ckpt else None  # good until a save succeeds
        self.best = ckpt.get("best") if ckpt else None  # {"step", "val_loss"} of best.pt

    def _write(self, path, run, step):
        """Save and redraw the loss curve; returns None, or the line saying why the save failed."""
        try:
            save_checkpoint(path, run, step, self.best)
        except (OSError, RuntimeError) as e:  # a full disk in torch's zip writer is a RuntimeError
            reason = str(e).strip().split("\n")[0][:160]
            free = shutil.disk_usage(existing_folder(path)).free / MB
            good = f"{self.last_good[0]} (step {self.last_good[1]})" if self.last_good else "none yet"
            return (f"could not save {path} at step {step} ({type(e).__name__}: {reason}; {free:,.1f} MB "
                    f"free); the last good checkpoint is {good}")
        self.last_good = (path, step)
        try:
            plot_loss(run.history, self.args.plot)
        except (OSError, RuntimeError) as e:
            print(f"train.py: warning: could not draw the loss curve {self.args.plot} ({e})", file=sys.stderr)
        return None

    def periodic(self, run, step):
        """checkpoint_step_{step}.pt beside --save; keep the newest --keep-last of the earlier ones."""
        failed = self._write(os.path.join(self.folder, f"checkpoint_step_{step}.pt"), run, step)
        if failed:
            retry = step + self.args.ckpt_interval
            print(f"train.py: warning: {failed}; training goes on"
                  + (f", the next try is at step {retry}" if retry <= self.args.steps else ""),
                  file=sys.stderr, flush=True)
            return
        if keep := self.args.keep_last:
            found = (PERIODIC.fullmatch(name) for name in os.listdir(self.folder or "."))
            older = sorted(int(m[1]) for m in found if m and int(m[1]) < step)  # later: an abandoned run
            for n in older[:max(0, len(older) - (keep - 1))]:
                with contextlib.suppress(OSError):  # one left over is no reason to stop training
                    os.remove(os.path.join(self.folder, f"checkpoint_step_{n}.pt"))

    def keep_best(self, run, step, val_loss):
        """best.pt when val_loss is the lowest so far."""
        if self.best and not val_loss < self.best["val_loss"]:
            return
        before, self.best = self.best, {"step": step, "val_loss": val_loss}
        failed = self._write(self.best_path, run, step)
        if failed:
            self.best = before  # best.pt still holds that one
            print(f"train.py: warning: {failed}; training goes on", file=sys.stderr, flush=True)
        else:
            print(f"best: {self.best_path} at step {step}, val loss {val_loss:.4f}", flush=True)

    def final(self, run, step):
        """--save at the end of the run; False (after the one line) when it could not be written."""
        failed = self._write(self.args.save, run, step)
        if failed:
            print(f"train.py: error: {failed}", file=sys.stderr, flush=True)
        return not failed
