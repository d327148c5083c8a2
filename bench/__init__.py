"""Benchmarks, each against transformers (or the plain path) measured in the same run:

    python -m bench               # training and generation speed, memory, MFU (bench/speed.py)
    python -m bench.space         # the served Space against model.py's fastest generation
    python -m bench.tokenizing    # tokenising a corpus into the token cache: speed and memory
"""
