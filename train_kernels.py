"""Training-only speed machinery for CPUs: a bf16 copy of the weights for forward and backward.

model.py stays the model a reader (and the Space, which never trains) needs; what only makes a
training step faster lives here, used by train.py and bench.py.

bf16 weights: under bf16 autocast every product casts its fp32 weight (and its fp32 input) to bf16
on the fly, forward and backward; on a 2-core Sapphire Rapids those casts were a quarter of a
135M training step. Here the model's fp32 weights stay the masters (AdamW updates them, checkpoints
save them) and a bf16 copy, refreshed once per optimizer step, runs forward and backward with
torch.func.functional_call, no autocast: activations and gradients in bf16, as in a bf16 model,
the gradients added into the masters' fp32 .grad after each backward. The copy is a function of
the masters, so a resumed run rebuilds it bit for bit.
"""
import torch


class LowPrecisionWeights:
    """Calls `model` with a `dtype` copy of its parameters; the fp32 parameters stay the masters."""

    def __init__(self, model, dtype=torch.bfloat16):
        self.model = model
        self.names, self.masters = zip(*model.named_parameters())  # the tied embedding once
        self.low = [p.detach().to(dtype).requires_grad_(p.requires_grad) for p in self.masters]
        self.params = dict(zip(self.names, self.low))

    def __call__(self, *args, **kwargs):
        # tie_weights (the default): lm_head.weight is the same bf16 tensor as the embedding
        return torch.func.functional_call(self.model, self.params, args, kwargs)

    @torch.no_grad()
    def accumulate_grads(self):
        """Add the copy's gradients into the masters' fp32 .grad (summing micro-batches in fp32)."""
        for master, low in zip(self.masters, self.low):
            if low.grad is None:
                continue
            if master.grad is None:
                master.grad = low.grad.to(master.dtype)
            else:
                master.grad.add_(low.grad)
            low.grad = None

    @torch.no_grad()
    def refresh(self):
        """Copy the masters into the bf16 copy: after every optimizer step."""
        torch._foreach_copy_(self.low, list(self.masters))
