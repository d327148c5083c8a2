"""The loss as the training loop calls it: the chunked loss of the model, compiled or eager, wrapped
in DDP across processes or not, run on a bf16 copy of the weights or not. Each choice is made once
here, at the start of a run: whether to compile (devices.pick_compile), and whether compiling works on
this machine, tried on a batch of zeros before any data is read (probe)."""
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from smollm2 import devices, speedups
from smollm2.chunked_loss import ChunkedLoss
from smollm2.errors import UsageError


class TrainingLoss:
    """TrainingLoss(model, ...)(x, y) -> the mean loss of one micro-batch, ready for backward.

    chunked: the plain ChunkedLoss of the model (evaluation uses it: uncompiled, unwrapped);
    fn: what a micro-step calls (chunked, compiled, in DDP, or on weight_copy);
    weight_copy: the bf16 copy of the weights (speedups.LowPrecisionWeights) or None."""

    def __init__(self, model, proc, precision, compile_request, horizon, gradient_checkpointing):
        self.proc, self.precision, self.compile_request = proc, precision, compile_request
        self.gradient_checkpointing = gradient_checkpointing
        self.chunked = ChunkedLoss(model)  # model(x, y)'s loss, without its logits
        n_params = sum(p.numel() for p in model.parameters())
        self.compiled, self.compile_reason = devices.pick_compile(proc.type, compile_request, n_params, horizon)
        self.wrap()

    def wrap(self):
        proc = self.proc
        self.fn = torch.compile(self.chunked) if self.compiled else self.chunked
        if proc.world > 1:
            # broadcast_buffers=False: the only buffers are the RoPE tables, equal on every rank
            self.fn = DDP(self.fn, device_ids=[proc.local_rank] if proc.type == "cuda" else None,
                          broadcast_buffers=False)
        # bf16 on CPU, eager: a bf16 copy of the weights instead of autocast's casts at every use
        self.weight_copy = None
        if speedups.use_weight_copy(proc.type, self.precision.dtype, self.compiled, self.gradient_checkpointing,
                                    proc.world):
            self.fn = self.weight_copy = speedups.LowPrecisionWeights(self.chunked)

    def __call__(self, x, y):
        """The micro-batch's loss: under autocast, or on the bf16 weight copy (which needs none)."""
        if self.weight_copy is not None:
            return self.fn(x, y)
        with self.precision.autocast:
            return self.fn(x, y)

    def sync_gradients(self, sync):
        """Under DDP: all-reduce the gradients in this backward (the last micro-step's) or not."""
        if self.proc.world > 1:
            self.fn.require_backward_grad_sync = sync

    def after_backward(self):
        if self.weight_copy is not None:
            self.weight_copy.accumulate_grads()  # into the fp32 masters' .grad

    def after_step(self):
        if self.weight_copy is not None:
            self.weight_copy.refresh()

    def probe(self, batch_size, seq_len, optimizer):
        """Compile now, on a forward and backward of a batch of zeros (no step, no data read, the
        gradients dropped), so that a machine that cannot compile (no C++ compiler, say) says so
        before training: --compile auto then trains eagerly, --compile on stops with one line."""
        if not self.compiled:
            return
        deterministic = torch.are_deterministic_algorithms_enabled()
        if self.proc.type == "cpu":
            speedups.deterministic_cpu_compile()  # else a resume would drift from the run it continues
        tokens = torch.zeros(batch_size * seq_len + 1, dtype=torch.long, device=self.proc.device)
        x, y = tokens[:-1].view(batch_size, seq_len), tokens[1:].view(batch_size, seq_len)  # as the loaders'
        cuda = [self.proc.device] if self.proc.type == "cuda" else []
        try:
            with torch.random.fork_rng(cuda):  # the run's random state as it was
                self.precision.backward(self(x, y))
        except Exception as e:  # Inductor's errors have no common base class
            if self.compile_request == "on":
                why = ": ".join([type(e).__name__] + str(e).strip().splitlines()[:1])
                raise UsageError(f"--compile on: torch.compile failed here ({why}); train with --compile off") from None
            self.compiled = False
            self.compile_reason = f"eager: torch.compile failed here ({type(e).__name__})"
            torch.use_deterministic_algorithms(deterministic)  # eager CPU training repeats without it
            self.wrap()
        finally:
            optimizer.zero_grad(set_to_none=True)
