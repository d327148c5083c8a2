"""smollm2: everything the entry points (train.py, eval.py, export.py, hf_files/app.py) use beside
model.py, one concern per module. Imports run one way: entry points -> smollm2 -> model.py, never
in a circle (tests/test_imports.py checks it). This file imports nothing, so importing one module
loads only what that module needs (the Space ships a few of them).
"""
