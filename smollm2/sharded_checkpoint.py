"""The sharded checkpoint folder that train.py --fsdp writes: its layout, its atomic write, and reading
it back. checkpoint.py is the door every training caller uses (it picks the file or the folder);
weights.py reads the weights out of a folder through this module directly, because it sits below
model.py and in the Space, where checkpoint.py does not.

A sharded checkpoint is a folder at the path a checkpoint file would have (checkpoint.pt/,
checkpoint_step_1000.pt/), written by torch.distributed.checkpoint (DCP): its `.metadata` and one
`__R_0.distcp` per rank, and train_state.pt with everything else a resume needs (step, LR horizon,
loader position, RNG states, arguments: the checkpoint file's entries without "model" and
"optimizer"). It is written in a temporary folder beside it and renamed into place once whole, so a
kill during a save leaves the previous one.
"""
import os
import shutil
import warnings

import torch
import torch.distributed as dist

from smollm2.files import sync_folder

TRAIN_STATE = "train_state.pt"


def is_sharded(path):
    """Whether path is a sharded checkpoint folder (DCP's .metadata in it)."""
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, ".metadata"))


def checkpoint_bytes(model, optimizer):
    """About the size of a sharded checkpoint, all ranks together: the whole model's weights and
    AdamW's two moments, in the dtype of the (fp32) masters."""
    return sum(3 * p.numel() * p.element_size() for p in model.parameters()) + 2**20


def save_sharded(path, model, optimizer, train_state, proc):
    """Every rank writes its shards into a temporary folder beside path; rank 0 adds train_state.pt,
    then renames the folder over path (the previous checkpoint, moved aside first, is removed once the
    new one is in place). Collective: every rank calls it. Raises OSError where it could not be
    written (path then still holds the previous checkpoint)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    folder, name = os.path.split(os.path.abspath(path))
    tmp = [os.path.join(folder, f".{name}.{os.getpid()}.tmp")]  # rank 0's process id names it
    dist.broadcast_object_list(tmp, src=0, group=proc.host_group)
    tmp = tmp[0]
    failed = None
    if proc.master:
        try:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        except OSError as e:
            failed = e
    if proc.any_rank(failed is not None):
        raise failed or OSError(f"rank 0 could not make {tmp}")
    model_state, optim_state = get_state_dict(model, optimizer)
    try:
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=tmp, process_group=proc.host_group)
    except BaseException as e:  # DCP's CheckpointException (a BaseException) carries every rank's failure
        if isinstance(e, (KeyboardInterrupt, SystemExit)):
            raise
        if proc.master:
            shutil.rmtree(tmp, ignore_errors=True)
        # not errors.reason: the first line names the exception itself ("CheckpointException ranks:...")
        raise OSError(f"a rank could not write its shards: {str(e).strip().splitlines()[0][:200]}") from None
    if proc.master:
        try:
            with open(os.path.join(tmp, TRAIN_STATE), "wb") as f:
                torch.save(train_state, f)
                f.flush()
                os.fsync(f.fileno())
            sync_folder(tmp)
            replace_folder(tmp, path)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            failed = e
    if proc.any_rank(failed is not None):  # every rank learns whether the checkpoint exists
        raise failed or OSError(f"rank 0 could not complete {path}")


def replace_folder(tmp, path):
    """Rename the finished folder tmp to path: a folder or file already at path is first moved aside
    (to .NAME.PID.old, which --ckpt auto moves back should a crash come between the two renames),
    then removed."""
    folder, name = os.path.split(os.path.abspath(path))
    old = os.path.join(folder, f".{name}.{os.getpid()}.old")
    if os.path.lexists(path):
        os.rename(path, old)
    os.rename(tmp, path)
    sync_folder(folder)
    if os.path.isdir(old):
        shutil.rmtree(old, ignore_errors=True)
    elif os.path.lexists(old):
        os.remove(old)


def load_train_state(path):
    """train_state.pt of a sharded checkpoint: the checkpoint's entries without model and optimizer."""
    return torch.load(os.path.join(path, TRAIN_STATE), map_location="cpu", weights_only=True)


def load_sharded(path, model, optimizer):
    """Load a sharded checkpoint's weights and AdamW state into model and optimizer (sharded by
    fully_shard, under any number of ranks: DCP reshards what another world size wrote). Collective."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def gather_weights(path):
    """The whole model's state dict from a sharded checkpoint, on CPU, in one process (eval.py,
    export.py, --init): the shapes and dtypes come from DCP's metadata, only the model's entries are read."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    reader = dcp.FileSystemReader(path)
    entries = reader.read_metadata().state_dict_metadata
    model = {key.removeprefix("model."): torch.empty(tuple(m.size), dtype=m.properties.dtype)
             for key, m in entries.items() if key.startswith("model.") and isinstance(m, TensorStorageMetadata)}
    state = {"model": model}
    with warnings.catch_warnings():  # "torch.distributed is ... uninitialized, assuming ... a single process": yes
        warnings.simplefilter("ignore", UserWarning)
        dcp.load(state, storage_reader=reader, no_dist=True)
    return state["model"]
