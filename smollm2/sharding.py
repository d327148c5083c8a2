"""Past one GPU's memory: FSDP2 (`torch.distributed.fsdp.fully_shard`) shards the weights, gradients
and AdamW state over the ranks (train.py --fsdp). This module only applies the sharding; the sharded
checkpoints such a run writes are checkpoint.py's (the folder itself: sharded_checkpoint.py).

As torchtitan applies it: each decoder layer is one unit (its weights are gathered just before it runs
and freed after), then the root: the ChunkedLoss around the model, holding what is left, the tied
embedding / lm_head (one matrix, one unit), the final norm. In bf16 where it is native, the gathered
weights are bf16 and the gradients are reduced in fp32 (MixedPrecisionPolicy); fp32 elsewhere.
"""
import contextlib
import os

import torch

from smollm2.errors import UsageError


def check_fsdp(proc, dtype):
    """--fsdp needs torchrun's processes (any number, 1 included) and trains in bf16 or fp32."""
    if "LOCAL_RANK" not in os.environ:
        raise UsageError("--fsdp shards the model over torchrun's processes: launch with torchrun, e.g. "
                         "torchrun --nproc_per_node=2 train.py --fsdp ...")
    if proc.type == "mps":
        raise UsageError("--fsdp: torch.distributed has no backend for a Mac's GPU (mps); use --device cpu")
    if dtype == "fp16":
        raise UsageError("--fsdp trains in bf16 (where it is native) or fp32, not fp16 (FSDP2 has no loss "
                         "scaler here): use --dtype fp32 on GPUs without bf16")


def fsdp_dtype(facts, requested):
    """The --dtype an --fsdp run trains in: auto is bf16 where it is native, else fp32 (not fp16)."""
    from smollm2.devices import pick_dtype
    if requested == "auto" and pick_dtype(facts)[0] == "fp16":
        return "fp32"
    return requested


def shard(loss_module, model, proc, dtype):
    """fully_shard each decoder layer of model, then loss_module (the root: it calls the model and
    holds the tied embedding / lm_head and the final norm). In place; the parameters become DTensors,
    so the optimizer must be made after this."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    mesh = init_device_mesh(proc.type, (proc.world,))
    policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
              if dtype == "bf16" else MixedPrecisionPolicy())
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh, mp_policy=policy)
    fully_shard(loss_module, mesh=mesh, mp_policy=policy)
    return loss_module


@contextlib.contextmanager
def gathered(root, model):
    """Inside: every weight of the sharded model whole on every rank, so that its forward passes run
    no collective and ranks may run different numbers of them (train.py scores --eval-tasks rows
    split over the ranks); sharded again after. FSDP2 takes the first module to run forward as its
    root: a one-token forward of the root first makes sure that is the root, not a decoder layer
    called directly (a new run whose first forward this is would fail at its next one otherwise)."""
    device = model.model.embed_tokens.weight.device
    with torch.no_grad():
        one = torch.zeros(1, 1, dtype=torch.long, device=device)
        root(one, one)
    layers = list(model.model.layers)
    for layer in layers:
        layer.set_reshard_after_forward(False, recurse=False)
    for unit in (root, *layers):
        unit.unshard()
    try:
        yield
    finally:
        for unit in (root, *layers):
            unit.reshard()
        for layer in layers:
            layer.set_reshard_after_forward(True, recurse=False)


def full_norm(norm):
    """clip_grad_norm_ over sharded gradients returns a DTensor: the whole norm as a plain tensor."""
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm
