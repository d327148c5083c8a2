"""Samples of the real run's checkpoints at a fixed seed (what docs/run-135m/README.md shows).

    python docs/run-135m/samples.py ~/run-135m/checkpoint_step_5000.pt ~/run-135m/checkpoint.pt ~/run-135m/best.pt
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from smollm2.tokenizer import load_tokenizer  # noqa: E402
from model import SmolLM2  # noqa: E402
from smollm2 import engine  # noqa: E402

PROMPT, TOKENS, SEED = "ROMEO:\n", 80, 1337

tok = load_tokenizer()
for path in sys.argv[1:]:
    model = SmolLM2.from_pretrained(path).eval()
    gen = torch.Generator().manual_seed(SEED)
    ids = engine.generate(model, tok.encode(PROMPT).ids, TOKENS, temperature=0.8, top_k=50, generator=gen)
    info = model.source_info
    print(f"--- {os.path.basename(path)} (step {info.get('step')}), temperature 0.8, top-k 50, seed {SEED}")
    print(PROMPT + tok.decode(ids))
