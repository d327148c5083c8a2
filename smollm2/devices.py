"""Device decisions: which device, which dtype to train in, whether to compile, the peak FLOP/s
behind MFU, how long a new run will take (roughly), peak memory.

Every decision is a small pure function of `DeviceFacts` (or of what is available), so each branch
is tested without the hardware (tests/test_devices.py feeds it a T4, an A100, CPUs with and without
bf16 units); `device_facts` and `cpu_info` are the one place that asks torch and /proc/cpuinfo about
the real machine. train.py logs the reason `pick_dtype` gives; the benchmarks and train.py share the
peak table.
"""
import contextlib
import os
import re
import resource
import sys
import time
from dataclasses import dataclass, field

import torch

from smollm2.errors import UsageError

DTYPES = ("auto", "fp32", "bf16", "fp16")
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # /proc/cpuinfo flags of native bf16 dot products


@dataclass(frozen=True)
class DeviceFacts:
    type: str  # "cuda", "cpu" or "mps"
    name: str = ""  # torch.cuda.get_device_name, or the CPU's model name
    capability: tuple = None  # CUDA compute capability, e.g. (7, 5) for a T4
    cpu_flags: frozenset = field(default_factory=frozenset)  # the CPU_BF16_FLAGS it has


def cpu_info(path="/proc/cpuinfo"):
    """(model name, vendor_id, every feature flag) of this machine's CPU: the one reader of
    /proc/cpuinfo; ("", "", empty) where there is none."""
    with contextlib.suppress(OSError):
        with open(path) as f:
            text = f.read()
        fields = {}
        for line in text.splitlines():  # the first processor's fields are every processor's
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
        return fields.get("model name", ""), fields.get("vendor_id", ""), frozenset(fields.get("flags", "").split())
    return "", "", frozenset()


def cpu_flags(path="/proc/cpuinfo"):
    """(model name, the CPU_BF16_FLAGS present); ("", empty) where there is no /proc/cpuinfo."""
    name, _, flags = cpu_info(path)
    return name, frozenset(f for f in CPU_BF16_FLAGS if f in flags)


def available_devices():
    """{device type: usable here}, in the order --device auto tries them."""
    return {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}


def pick_device(requested, available):
    """The device to run on for --device `requested` ("auto", "cpu", "cuda", "cuda:N", "mps"), given
    `available` as available_devices() gives it; UsageError for one that is not there. The one device
    choice of train.py, eval.py and the Space."""
    if requested == "auto":
        return next(kind for kind, ok in available.items() if ok)
    if not available.get(requested.split(":")[0]):
        raise UsageError(f"--device {requested}: not available here; use auto, cpu, cuda, cuda:N or mps")
    return requested


def device_facts(device):
    """The facts pick_dtype needs about torch.device `device`, asked of this machine."""
    device = torch.device(device)
    if device.type == "cuda":
        # the capability, not torch.cuda.is_bf16_supported(): a T4 answers True to that, emulated
        return DeviceFacts("cuda", torch.cuda.get_device_name(device), torch.cuda.get_device_capability(device))
    if device.type == "cpu":
        name, flags = cpu_flags()
        return DeviceFacts("cpu", name, cpu_flags=flags)
    return DeviceFacts(device.type)


def cpu_bf16():
    """Whether this CPU has native bf16 matmuls: train.py's --dtype auto trains in bf16 there, the benchmark
    adds its bf16 rows and the Space serves bf16 weights."""
    return pick_dtype(device_facts("cpu"))[0] == "bf16"


def pick_dtype(facts, requested="auto"):
    """(dtype, reason) to train in: "fp32", "bf16" or "fp16", and one line for the start-up log."""
    if requested != "auto":
        note = ""
        if requested == "bf16" and facts.type == "cuda" and facts.capability and facts.capability < (8, 0):
            note = f": emulated on compute capability {facts.capability[0]}.{facts.capability[1]}, slow"
        return requested, f"{describe_dtype(requested)} (--dtype {requested}{note})"
    if facts.type == "cuda":
        major, minor = facts.capability
        if facts.capability >= (8, 0):
            return "bf16", f"bf16 autocast: native bf16 on compute capability {major}.{minor}"
        return "fp16", (f"fp16 autocast + GradScaler: compute capability {major}.{minor} has fp16 tensor "
                        "cores but no native bf16 (it needs 8.0)")
    if facts.type == "cpu":
        native = [f for f in CPU_BF16_FLAGS if f in facts.cpu_flags]
        if native:
            return "bf16", f"bf16 autocast: native bf16 matmuls on this CPU ({', '.join(native)})"
        return "fp32", "fp32: this CPU has no native bf16 matmuls (no amx_bf16 or avx512_bf16)"
    # MPS: autocast and GradScaler on MPS are recent and untested here; fp32 is what works everywhere
    return "fp32", f"fp32: the default on {facts.type} (pass --dtype bf16 or fp16 to try autocast there)"


COMPILE = ("auto", "on", "off")
COMPILE_MIN_PARAMS, COMPILE_MIN_STEPS = 100e6, 500


def pick_compile(device_type, requested, n_params, steps):
    """(compile?, reason) for training a model of n_params for `steps` steps (the run's horizon: the
    same for a run and its resumes). "auto" compiles on CPU for runs of >= 500 steps of models of
    >= 100M parameters, where Inductor's one-off compilation (about a minute on 2 cores) is repaid
    within a few hundred steps (docs/performance.md: the gains measured). Not on GPUs by default:
    not measured there (--compile on)."""
    if requested != "auto":
        return requested == "on", f"--compile {requested}"
    if device_type != "cpu":
        return False, f"eager: --compile auto compiles on CPU only (pass --compile on {device_type})"
    if n_params < COMPILE_MIN_PARAMS or steps < COMPILE_MIN_STEPS:
        return False, (f"eager: --compile auto compiles runs of >= {COMPILE_MIN_STEPS} steps of models of "
                       f">= {COMPILE_MIN_PARAMS / 1e6:.0f}M parameters on CPU, where compiling pays")
    return True, "torch.compile: a run this long on CPU repays its one-off compilation (--compile off: eager)"


CUDA_GRAPH_MAX_TOKENS = 8192  # micro-steps of up to this many tokens launch as one CUDA graph


def compile_mode(device_type, tokens_per_micro_step, world, gradient_checkpointing, grad_accum=1, sharded=False):
    """torch.compile's mode for a compiled training step: "reduce-overhead" (CUDA graphs) for small
    micro-steps on one GPU, whose thousands of short kernels otherwise each wait on a launch from
    Python; None (the default mode) elsewhere: large steps keep the GPU busy without graphs, DDP's
    graphs split at gradient buckets, recomputation (gradient checkpointing) reruns parts of the
    graph, a CPU has no launches to save, FSDP (even on one rank) allocates the gathered weights anew
    every step, and with grad_accum > 1 a second backward would add into gradients that live in the
    graph's memory pool, overwritten by the next replay ("accessing tensor output of CUDAGraphs that
    has been overwritten"). Not measured on a GPU yet (docs/gpu.md)."""
    if (device_type == "cuda" and world == 1 and not gradient_checkpointing and grad_accum == 1 and not sharded
            and 0 < tokens_per_micro_step <= CUDA_GRAPH_MAX_TOKENS):
        return "reduce-overhead"
    return None


GPU_STEP_TOKENS = 65536  # fewer tokens a step than this leave a GPU mostly idle for a 135M model


def batch_advice(device_type, tokens_per_step):
    """A line for the start-up log when a GPU trains on small steps (the defaults, 1,024 tokens, are
    sized for a CPU), else None."""
    if device_type != "cuda" or tokens_per_step >= GPU_STEP_TOKENS:
        return None
    return (f"{tokens_per_step:,} tokens a step leave a GPU mostly idle: raise --batch-size and --seq-len "
            f"until the log's mem nears the card's memory, then --grad-accum, to {GPU_STEP_TOKENS:,}+ tokens a "
            "step, and --lr with about the square root of the batch's growth (docs/gpu.md)")


def deterministic_mode(device_type):
    """Deterministic kernels from here on, process-wide as torch's flag is, so that a run and its
    resume repeat bit for bit: train.py --deterministic, and every compiled CPU run (training_loss.py).
    On CPU, Inductor's kernels add into the embedding's gradient with atomics from every thread (two
    runs of the same steps drift apart in the last bits within a few steps); in this mode it calls
    aten's serial index_put_ there instead, no slower. On CUDA the flag also picks SDPA's deterministic
    backward (flash, memory-efficient) and Inductor's deterministic mode (no autotuning that changes
    numerics); cuBLAS needs a fixed workspace too, set before the first CUDA product (train.py calls
    this before anything runs on the device)."""
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = False  # no NaN fill of every new tensor
    if device_type != "cpu":
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def describe_dtype(dtype):
    return {"fp32": "fp32", "bf16": "bf16 autocast", "fp16": "fp16 autocast + GradScaler"}[dtype]


def autocast(device_type, dtype):
    """The context a forward pass runs in: autocast to bf16/fp16, nothing for fp32."""
    if dtype == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=TORCH_DTYPES[dtype])


def grad_scaler(device_type, dtype):
    """A GradScaler for fp16 (bf16 has fp32's range: no loss scaling), else None."""
    return torch.amp.GradScaler(device_type) if dtype == "fp16" else None


# ----------------------------------------------------------------------------- MFU
# Dense 16-bit tensor-core peaks (FLOP/s; bf16, or fp16 where there is no bf16), from NVIDIA's data
# sheets. Keys are whole words of torch.cuda.get_device_name(); the longest matching key wins, so
# "NVIDIA H100 PCIe" is the PCIe card and "NVIDIA H100 80GB HBM3" the SXM one.
PEAK_FLOPS = {
    "B200": 2250e12, "H200": 989e12, "GH200": 989e12, "H100": 989e12, "H100 PCIe": 756e12,
    "H100 NVL": 835e12, "A100": 312e12, "A800": 312e12, "L40S": 362e12, "L40": 181e12, "L4": 121e12,
    "A10": 125e12, "A10G": 70e12, "RTX A6000": 155e12, "V100": 125e12, "T4": 65e12,
}


def peak_flops(gpu_name, table=PEAK_FLOPS):
    """The table's peak for this GPU name, matched by whole words, longest key first; None if unknown
    (better no MFU than a wrong one: "L4" must not match "NVIDIA L40S", nor "A100" "RTX A1000")."""
    words = " ".join(re.split(r"[^A-Za-z0-9]+", gpu_name.upper()))
    for key in sorted(table, key=len, reverse=True):
        if re.search(rf"(^| ){re.escape(key.upper())}( |$)", words):
            return table[key]
    return None


def mfu(tokens_per_s, flops_per_token, peak, device_type, world):
    """Model FLOPs utilisation: the training FLOP/s achieved over the peak of the devices in use. `peak`
    is one device's: world GPUs have world times it, while CPU processes share one machine's."""
    devices_used = world if device_type == "cuda" else 1
    return tokens_per_s * flops_per_token / (peak * devices_used)


# ----------------------------------------------------------------------------- time estimates
# Training speed as a multiple of the fp32 matmul rate that matmul_flops measures at the model's
# width (CPUs, MPS, GPUs not in the table). On 2 cores of three CPUs the 135M model's steps ran at
# 0.64-1.2x that rate in fp32 and 1.5-1.8x in bf16 (an AMD EPYC Zen 5, 2026-12-04: 215 GFLOP/s
# measured, 300 and 460 tokens/s of 0.86 GFLOP; the Zen 4 and the AMX Xeon of docs/performance.md).
MEASURED_SPEEDUP = {"fp32": 1.0, "bf16": 1.7}
# Of the table's 16-bit peak (or --peak-flops): a guess for a small model on a large GPU; fp32 runs
# on TF32 tensor cores, at half that rate.
PEAK_SHARE = {"fp32": 0.15, "bf16": 0.3, "fp16": 0.3}


def matmul_flops(device, width, rows=256, seconds=0.1):
    """FLOP/s of fp32 (rows, width) x (width, width) products on device: the fastest of those that
    fit in about `seconds`. On a CPU, timed on one thread, times the threads torch uses: on a busy
    machine every product of several threads waits for the slowest, while some short products on
    one thread run undisturbed (2 busy cores: 21-218 GFLOP/s on 2 threads, 211-224 this way).
    Constant inputs: the run's random state stays as it was."""
    kind, threads = torch.device(device).type, torch.get_num_threads()
    stands_for = threads if kind == "cpu" else 1  # the threads the one measured stands for
    a = torch.full((rows, width), 0.5, device=device)
    b = torch.full((width, width), 0.25, device=device)
    def sync():  # a GPU's product is timed when it is done, not when it is queued
        synchronize(device)
    if kind == "cpu":
        torch.set_num_threads(1)
    try:
        a @ b  # the first one sets the kernel up
        sync()
        fastest, start = float("inf"), time.perf_counter()
        while time.perf_counter() - start < seconds or fastest == float("inf"):
            t = time.perf_counter()
            a @ b
            sync()
            fastest = min(fastest, time.perf_counter() - t)
    finally:
        torch.set_num_threads(threads)  # as it was: a run's CPU arithmetic depends on it
    return 2 * rows * width * width / fastest * stands_for


def asynchronous(device_type):
    """Whether this kind of device queues work and returns before it is done (a clock read after
    queueing times the queueing, not the work)."""
    return device_type in ("cuda", "mps")


def synchronize(device):
    """Wait until `device` has done the work queued on it (nothing to wait for on a CPU)."""
    device = torch.device(device)
    if asynchronous(device.type):
        torch.cuda.synchronize(device) if device.type == "cuda" else torch.mps.synchronize()


def to_device(t, device):
    """CPU tensor t on device, the host not waiting for the copy: on a GPU pinned, then copied
    asynchronously (from pageable memory the copy would wait for the GPU's queued work to drain)."""
    if torch.device(device).type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


def training_flops_per_s(dtype, measured=None, peak=None):
    """The FLOP/s training steps in dtype are expected to reach: a share of the peak where there is
    one (a GPU in the table, --peak-flops), else a multiple of the measured fp32 matmul rate."""
    if peak:
        return peak * PEAK_SHARE.get(dtype, PEAK_SHARE["fp32"])
    return measured * MEASURED_SPEEDUP.get(dtype, MEASURED_SPEEDUP["fp32"])


def time_estimate(tokens, flops_per_token, flops_per_s):
    """How long training `tokens` tokens of flops_per_token takes at flops_per_s, said as rough:
    'about 1.7 h', 'about 25 min', 'about 40 s'."""
    seconds = tokens * flops_per_token / flops_per_s
    if seconds >= 90 * 60:
        return f"about {seconds / 3600:.1f} h"
    if seconds >= 90:
        return f"about {round(seconds / 60)} min"
    return f"about {max(1, round(seconds))} s"


# ----------------------------------------------------------------------------- memory
def peak_memory(device):
    """Peak bytes of this process so far: CUDA's max_memory_allocated (tensors), else the peak RSS
    (everything: Python, torch, weights, activations). None on MPS, which keeps no peak."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    if device.type == "mps":
        return None
    # Linux: VmHWM, the peak of this program's own memory. getrusage's ru_maxrss survives exec, so a
    # process started by a large one (pytest, a notebook) would report its parent's peak.
    with contextlib.suppress(OSError, StopIteration, ValueError):
        with open("/proc/self/status") as f:
            return int(next(line for line in f if line.startswith("VmHWM:")).split()[1]) * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # macOS counts bytes, Linux KiB
