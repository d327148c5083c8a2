"""This training process among its peers: one process, or one of torchrun's (RANK, LOCAL_RANK,
WORLD_SIZE), on nccl between GPUs and gloo between CPU processes; its device. train.py's DDP set-up,
its sums over ranks and its exit."""
import datetime
import os
import sys

import torch
import torch.distributed as dist

from smollm2.devices import available_devices, pick_device
from smollm2.errors import UsageError


def backend(device_type, world):
    """The process group's backend for `world` processes training on `device_type`: nccl between GPUs,
    gloo between CPU processes; UsageError where there is none (gloo cannot move MPS tensors)."""
    if device_type == "cuda":
        return "nccl"
    if device_type == "mps" and world > 1:
        raise UsageError(f"{world} processes on a Mac's GPU (mps): torch.distributed has no backend for it; "
                         "train in one process (python train.py), or on CPU processes with --device cpu")
    return "gloo"


class Process:
    """This process: its rank and local rank among `world` processes (torchrun's RANK, LOCAL_RANK,
    WORLD_SIZE; 0, 0, 1 alone), its device, and whether it is the master (rank 0: logs and saves)."""

    def __init__(self, device):
        self.rank, self.local_rank = int(os.environ.get("RANK", 0)), int(os.environ.get("LOCAL_RANK", 0))
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        device = pick_device(device, available_devices())
        self.type = device.split(":")[0]
        if self.type == "cuda" and self.world > 1:
            device = f"cuda:{self.local_rank}"
        self.device, self.master = torch.device(device), self.rank == 0
        self.backend = backend(self.type, self.world)
        self.host_group = None

    def start(self):
        if self.type == "cuda" and self.device.index is not None:
            torch.cuda.set_device(self.device)  # --device cuda:N, or this rank's GPU: kernels go there
        if self.world > 1:
            cuda = self.type == "cuda"
            dist.init_process_group(self.backend, **({"device_id": self.device} if cuda else {}))
            # What the ranks tell each other between steps (a stop signal, a stream's position) and
            # the wait while rank 0 tokenises a large corpus, for hours maybe, run on a gloo group of
            # CPU tensors with a long timeout: no GPU sync, and not in NCCL (its watchdog aborts at 10 min).
            self.host_group = dist.new_group(backend="gloo", timeout=datetime.timedelta(hours=24))

    def barrier(self):
        """Wait for every rank, however long rank 0's tokenisation takes."""
        if self.world > 1:
            dist.barrier(group=self.host_group)

    def any_rank(self, flag):
        """Whether `flag` (a bool) is true on any rank: a host-side all-reduce, no device sync."""
        if self.world == 1:
            return flag
        t = torch.tensor(float(flag))
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.host_group)
        return bool(t.item())

    def all_sum(self, t):
        if self.world > 1:
            dist.all_reduce(t)
        return t


def exit_process(status):
    """sys.exit, but a torchrun process leaves with os._exit once its output is flushed. A gloo
    thread that has finished an all-reduce then needs the GIL to let go of the tensor: if Python is
    shutting down by then the process aborts (SIGABRT; a third to half of 2-process CPU runs here),
    and freeing the process group first can deadlock on that GIL (torch 2.13; see
    pytorch/pytorch#190489). Everything is saved by now; the OS closes the group's sockets."""
    if dist.is_initialized():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)
