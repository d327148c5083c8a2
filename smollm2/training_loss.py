"""The loss as the training loop calls it: the chunked loss of the model, compiled or eager, wrapped
in DDP across processes or sharded by FSDP (sharding.py) or neither, run on a bf16 copy of the weights or not. Each choice is made once
here, at the start of a run: whether to compile (devices.pick_compile), and whether compiling works on
this machine, tried on a batch of zeros before any data is read (probe)."""
import inspect

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from smollm2 import devices, speedups
from smollm2.chunked_loss import ChunkedLoss
from smollm2.errors import UsageError, reason

# No buffer broadcast before each forward: the only buffers are the RoPE tables, equal on every rank
# (newer torch calls the flag forward_sync_buffers and warns at the old name)
NO_BUFFER_SYNC = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(DDP).parameters
                  else {"broadcast_buffers": False})


class TrainingLoss:
    """TrainingLoss(model, ...)(x, y) -> the mean loss of one micro-batch, ready for backward.

    chunked: the plain ChunkedLoss of the model (evaluation uses it: uncompiled, unwrapped);
    fn: what a micro-step calls (chunked, compiled, in DDP, or on weight_copy);
    weight_copy: the bf16 copy of the weights (speedups.LowPrecisionWeights) or None."""

    def __init__(self, model, proc, precision, compile_request, compile_choice, gradient_checkpointing,
                 tokens_per_micro_step=0, sharded=None, grad_accum=1, optimizer=None):
        """compile_choice: devices.pick_compile's (compile or not, why) for this run (train.py makes
        it once, before speedups.install); sharded: under --fsdp, the ChunkedLoss that sharding.shard
        made the FSDP root (no DDP then); grad_accum: micro-steps per optimizer step (DDP reduces
        gradients in the last one's backward, FSDP in each); optimizer: the one whose steps refresh the bf16
        weight copy and whose gradients the probe drops."""
        self.proc, self.precision, self.compile_request = proc, precision, compile_request
        self.gradient_checkpointing, self.sharded = gradient_checkpointing, sharded
        self.grad_accum, self.optimizer, self.micro_steps = grad_accum, optimizer, 0
        self.chunked = sharded or ChunkedLoss(model)  # model(x, y)'s loss, without its logits
        self.compiled, self.compile_reason = compile_choice
        self.weight_copy = None
        self.mode = devices.compile_mode(proc.type, tokens_per_micro_step, proc.world, gradient_checkpointing,
                                         grad_accum, sharded is not None)
        if self.compiled and self.mode:
            self.compile_reason += f", mode {self.mode} (CUDA graphs: small steps launch as one)"
        self.wrap()

    def wrap(self):
        """fn: DDP around the chunked loss, then torch.compile around that (DDP-aware compilation:
        graphs split at gradient buckets, so their all-reduces overlap the rest of backward)."""
        proc = self.proc
        self.ddp = None
        self.fn = self.chunked
        if proc.world > 1 and self.sharded is None:
            self.fn = self.ddp = DDP(self.chunked, device_ids=[proc.local_rank] if proc.type == "cuda" else None,
                                     **NO_BUFFER_SYNC)
        if self.compiled:
            self.fn = torch.compile(self.fn, mode=self.mode)
        # bf16 on CPU, eager: a bf16 copy of the weights instead of autocast's casts at every use
        if self.weight_copy is not None:
            self.weight_copy.remove()  # a second wrap (compiling failed): one copy, one set of hooks
        self.weight_copy = None
        if self.sharded is None and speedups.use_weight_copy(proc.type, self.precision.dtype, self.compiled,
                                                             self.gradient_checkpointing, proc.world):
            self.fn = self.weight_copy = speedups.LowPrecisionWeights(self.chunked, self.optimizer)

    def __call__(self, *batch):
        """The micro-batch's loss (batch: x, y, and for packed conversations doc): under autocast, or
        on the bf16 weight copy (which needs none). Under DDP the gradients are all-reduced in the
        backward of every grad_accum-th call only (the last micro-step of an optimizer step)."""
        self.micro_steps += 1
        self.sync_gradients(self.micro_steps % self.grad_accum == 0)
        return self.forward(*batch)

    def forward(self, *batch):
        if self.compiled and self.mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()  # the last micro-step's graph outputs are spent
        if self.weight_copy is not None:
            return self.fn(*batch)
        with self.precision.autocast:
            return self.fn(*batch)

    def sync_gradients(self, sync):
        """Under DDP: all-reduce the gradients in the next backward or not. FSDP reduce-scatters them
        in every backward, its default: skipping that would hold every rank's whole fp32 gradients
        between micro-steps (6.8 GB at 1.7B), the memory FSDP is there to save."""
        if self.ddp is not None:
            self.ddp.require_backward_grad_sync = sync

    def probe(self, batch_size, seq_len):
        """Compile now, on a forward and backward of a batch of zeros (no step, no data read, the
        gradients dropped and not all-reduced), so that a machine that cannot compile (no C++
        compiler, say) says so before training: --compile auto then trains eagerly, --compile on stops
        with one line. Under DDP and FSDP the ranks decide together: a compile that fails on one rank
        makes every rank train eagerly (or stop), never some ranks compiled and the others waiting."""
        if not self.compiled:
            return
        deterministic = torch.are_deterministic_algorithms_enabled()
        if self.proc.type == "cpu":
            devices.deterministic_mode("cpu")  # else a resume would drift from the run it continues
        tokens = torch.zeros(batch_size * seq_len + 1, dtype=torch.long, device=self.proc.device)
        x, y = tokens[:-1].view(batch_size, seq_len), tokens[1:].view(batch_size, seq_len)  # as the loaders'
        cuda = [self.proc.device] if self.proc.type == "cuda" else []
        failure, failed = None, False
        if self.sharded is not None:
            # FSDP's probe gathers weights from every rank: a rank whose compile fails before its
            # first all-gather would leave the others waiting there for good. So the ranks first
            # agree on a compile with no collective in it (a missing C++ compiler shows there).
            failure = compile_failure(self.proc.device)
            failed = self.proc.any_rank(failure is not None)
        if not failed:
            try:
                # DDP: no all-reduce, which a rank whose compile failed would never join. FSDP's
                # forward gathers weights from every rank anyway, and its backward reduce-scatters.
                self.sync_gradients(False)
                with torch.random.fork_rng(cuda):  # the run's random state as it was
                    self.precision.backward(self.forward(x, y))
            except Exception as e:  # Inductor's errors have no common base class
                failure = reason(e)
            finally:
                self.optimizer.zero_grad(set_to_none=True)
                self.micro_steps = 0  # the run's first micro-step comes next
            failed = self.proc.any_rank(failure is not None)
        if not failed:
            return
        failure = failure or "it failed on another rank"
        if self.compile_request == "on":
            raise UsageError(f"--compile on: torch.compile failed here ({failure}); train with --compile off")
        self.compiled = False
        self.compile_reason = f"eager: torch.compile failed here ({failure.split(':')[0]})"
        torch.use_deterministic_algorithms(deterministic)  # eager CPU training repeats without it
        self.wrap()


def compile_failure(device):
    """Why torch.compile cannot build and run a small function on device here (one line), or None.
    It runs on this rank alone: no collective, so a failure cannot leave other ranks waiting."""
    try:
        fn = torch.compile(lambda t: torch.nn.functional.silu(t) * 2.0 + 1.0, fullgraph=True)
        fn(torch.ones(8, device=device))
    except Exception as e:  # Inductor's errors have no common base class
        return reason(e)
    return None
