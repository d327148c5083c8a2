"""The optimizer and the learning-rate schedule of a training run, as pure functions of the settings
and the step: what train.py calls once (make_optimizer, lr_horizon) and at every step (lr_at, set_lr).

Two optimizers (--optimizer):
- adamw: AdamW (0.9, 0.95), weight decay on the matrices only (nanoGPT's rule), fused.
- muon: Muon (torch.optim.Muon, Keller Jordan's; Newton-Schulz in bf16) for the 2-D matrices of the
  decoder layers (q, k, v, o, gate, up, down), AdamW for everything else: the tied embedding/head and
  the norms. Muon's adjust_lr_fn="match_rms_adamw" (Moonshot, "Muon is Scalable for LLM Training")
  scales its orthogonal update to AdamW's RMS, so one --lr and one --weight-decay serve both. Its
  momentum warms up 0.85 -> 0.95 over the first MUON_MOMENTUM_WARMUP steps (modded-nanogpt).
  Orthogonalising costs a fixed ~2*5*(3 m n^2) FLOPs per matrix per optimizer step, whatever the batch.

Two schedules (--schedule), both from a linear warmup to --lr and ending at --min-lr at the horizon:
- cosine: a cosine from --lr down to --min-lr at the horizon.
- wsd (warmup-stable-decay, SmolLM2's own): flat at --lr, then a decay over the last --decay-frac of
  the horizon, linear (SmolLM2) or 1-sqrt (Hägele et al. 2024), to --min-lr.
The horizon is the first launch's --steps, kept in the checkpoint ("lr_horizon"); a wsd run resumed
with another --steps before its decay began moves the decay to the new end (lr_horizon).
"""
import math

import torch

OPTIMIZERS = ("adamw", "muon")
SCHEDULES = ("cosine", "wsd")
DECAY_SHAPES = ("linear", "1-sqrt")
DEFAULT_LR = {"adamw": 3e-4, "muon": 3e-3}  # --lr when not given: Muon's bounded updates take 10x more
MUON_MOMENTUM = (0.85, 0.95)  # Muon's momentum, warmed from the first to the second over:
MUON_MOMENTUM_WARMUP = 300  # optimizer steps


# ----------------------------------------------------------------------------- the optimizer
def muon_matrices(model):
    """[(name, parameter)] of the 2-D hidden matrices that Muon orthogonalises: every 2-D weight of
    the decoder layers (attention and MLP projections); not the embedding, which is the LM head too."""
    return [(n, p) for n, p in model.named_parameters()
            if p.requires_grad and p.dim() == 2 and n.startswith("model.layers.")]


def param_groups(model, kind, weight_decay):
    """The optimizer's parameter groups: [muon matrices (muon only)], AdamW's matrices with weight
    decay, AdamW's vectors (norms) without. Every trainable parameter is in exactly one."""
    muon = {id(p) for _, p in muon_matrices(model)} if kind == "muon" else set()
    params = [p for p in model.parameters() if p.requires_grad]  # a tied tensor once
    rest = [p for p in params if id(p) not in muon]
    groups = [{"params": [p for p in rest if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}]  # norms: no decay
    if kind == "muon":
        groups.insert(0, {"params": [p for p in params if id(p) in muon], "weight_decay": weight_decay})
    return groups


def make_optimizer(model, args, fused=True):
    """AdamW, or Muon for the hidden matrices and AdamW for the rest (one MuonAdamW), at args.lr."""
    groups = param_groups(model, args.optimizer, args.weight_decay)
    # fused: one kernel for every parameter (on CPU since torch 2.4: 55 ms a step at 135M against 285)
    adamw = lambda gs: torch.optim.AdamW(gs, lr=args.lr, betas=(0.9, 0.95), eps=1e-8,  # noqa: E731
                                         fused=True if fused else None)
    if args.optimizer == "adamw":
        return adamw(groups)
    muon = torch.optim.Muon(groups[:1], lr=args.lr, momentum=MUON_MOMENTUM[1], nesterov=True,
                            adjust_lr_fn="match_rms_adamw")
    return MuonAdamW(muon, adamw(groups[1:]))


class MuonAdamW(torch.optim.Optimizer):
    """One optimizer over two: Muon's groups first, then AdamW's. They share this optimizer's groups
    (the same dicts) and state, so that what loops, checkpoints, GradScaler and step hooks do with one
    optimizer (param_groups, state, state_dict, zero_grad, register_step_post_hook) covers both."""

    def __init__(self, muon, adamw):
        self.muon, self.adamw = muon, adamw
        super().__init__(muon.param_groups + adamw.param_groups, {})  # the same group dicts
        self._share()

    def _share(self):
        n = len(self.muon.param_groups)
        self.muon.param_groups, self.adamw.param_groups = self.param_groups[:n], self.param_groups[n:]
        self.muon.state = self.adamw.state = self.state

    @torch.no_grad()
    def step(self, closure=None):
        self.muon.step()
        self.adamw.step()

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)  # new group dicts and state: share them again
        self._share()


def set_lr(optimizer, lr, step):
    """Every group's LR for optimizer step `step`; Muon's groups also get their warmed-up momentum."""
    for group in optimizer.param_groups:
        group["lr"] = lr
        if "ns_steps" in group:  # a Muon group
            start, end = MUON_MOMENTUM
            group["momentum"] = start + (end - start) * min(1.0, step / MUON_MOMENTUM_WARMUP)


def set_weight_decay(optimizer, weight_decay):
    """--weight-decay on every group of matrices (a resumed run may change it); vectors keep none."""
    for group in optimizer.param_groups:
        if group["params"] and group["params"][0].dim() >= 2:
            group["weight_decay"] = weight_decay


# ----------------------------------------------------------------------------- the schedule
def get_lr(step, lr, min_lr, warmup, horizon):
    """LR of optimizer step `step` (0-based) under cosine: linear warmup, cosine decay to min_lr at
    `horizon`, min_lr after it."""
    if step >= horizon:
        return min_lr
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, horizon - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)


def decay_start(horizon, decay_frac):
    """The steps wsd runs flat (warmup included) before its decay, which takes the last decay_frac of
    the horizon: 0-based step decay_start(...) is the first below the peak."""
    return horizon - int(round(decay_frac * horizon))


def wsd_lr(step, lr, min_lr, warmup, horizon, decay_frac, shape="linear"):
    """LR of optimizer step `step` (0-based) under wsd: linear warmup, flat at lr, then from
    decay_start a linear or 1-sqrt decay that reaches min_lr at `horizon`; min_lr after it."""
    if step >= horizon:
        return min_lr
    warming = lr * min(1.0, (step + 1) / warmup) if warmup else lr
    start = decay_start(horizon, decay_frac)
    if step < start:
        return warming
    progress = (step + 1 - start) / max(1, horizon - start)  # 1 at the last step: min_lr
    remaining = 1.0 - progress if shape == "linear" else 1.0 - math.sqrt(progress)
    return min(warming, min_lr + remaining * (lr - min_lr))  # a warmup longer than the flat part: no jump


def lr_at(step, args, horizon):
    """The LR of optimizer step `step` under the run's --schedule."""
    if args.schedule == "wsd":
        return wsd_lr(step, args.lr, args.min_lr, args.warmup, horizon, args.decay_frac, args.decay_shape)
    return get_lr(step, args.lr, args.min_lr, args.warmup, horizon)


def lr_horizon(args, ckpt):
    """(the step where the schedule ends, the horizon it replaces or None). A new run's is its --steps;
    a resumed run keeps its checkpoint's, except that wsd, resumed before its decay began (under the
    old plan and the new one), moves the decay to the new --steps: the flat part just goes on."""
    if not ckpt:
        return args.steps, None
    saved, step = ckpt["lr_horizon"], ckpt["step"]
    if (args.schedule == "wsd" and args.steps != saved
            and step <= min(decay_start(saved, args.decay_frac), decay_start(args.steps, args.decay_frac))):
        return args.steps, saved
    return saved, None
