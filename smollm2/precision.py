"""The precision a run trains in, as the loop uses it: the autocast context of its forward passes,
fp16's GradScaler (scale, unscale before clipping, skip the steps whose gradients overflowed) and the
count of those skipped steps, kept on the device so that no step waits for the host. Its state_dict
is the checkpoint's "scaler" entry. devices.pick_dtype chooses the dtype."""
import math

import torch

from smollm2 import devices


class Precision:
    def __init__(self, facts, requested, device):
        self.dtype, self.reason = devices.pick_dtype(facts, requested)  # "fp32", "bf16" or "fp16"
        self.autocast = devices.autocast(facts.type, self.dtype)  # the forward pass's context
        self.scaler = devices.grad_scaler(facts.type, self.dtype)  # fp16 only
        self.skipped, self.pending_skips = 0, torch.zeros((), dtype=torch.long, device=device)
        self.notice = None  # a line for the start-up log when a resume changes the dtype

    def backward(self, loss):
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def unscale(self, optimizer):
        """Before clipping: clip the true gradients, not the scaled ones."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer, norm):
        if self.scaler is None:
            optimizer.step()
            return
        # GradScaler skips the step when a gradient holds an inf or nan, and so the norm does
        # (an fp32 norm of finite gradients would overflow only near 1e19)
        self.pending_skips += ~torch.isfinite(norm)  # counted on the device: no host sync per step
        self.scaler.step(optimizer)
        self.scaler.update()

    def skipped_steps(self):
        """Steps skipped by GradScaler for inf/nan gradients so far (a host sync: log steps, saves)."""
        self.skipped += int(self.pending_skips.item())
        self.pending_skips.zero_()
        return self.skipped

    def diverged(self, loss):
        """fp16: a non-finite loss is an overflow that GradScaler handles (it skips the step and halves
        the scale), until the scale has fallen below 1: then no scale helps, the run has diverged."""
        return not math.isfinite(loss) and (self.scaler is None or self.scaler.get_scale() < 1)

    def state_dict(self):
        """The checkpoint's "scaler": the dtype trained in, skipped steps and GradScaler's state (fp16)."""
        return {"dtype": self.dtype, "skipped_steps": self.skipped_steps(),
                "state": self.scaler.state_dict() if self.scaler is not None else None}

    def load_state_dict(self, saved):
        if not saved:
            return
        self.skipped = saved.get("skipped_steps", 0)
        if saved.get("dtype") != self.dtype:
            self.notice = (f"resuming a {saved.get('dtype')} run in {self.dtype}"
                           + (": its GradScaler state is dropped" if saved.get("state") else "")
                           + ("; a new GradScaler starts" if self.scaler is not None else ""))
        elif self.scaler is not None and saved.get("state"):
            self.scaler.load_state_dict(saved["state"])  # scale and growth tracker: resume bit for bit
