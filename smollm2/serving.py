"""Serving for the Space (hf_files/app.py), around smollm2/batching.py's Batcher, which decodes every
request on one thread with all the cores: the KV cache sizes a pass reads, the compiled one-row
decoder's build in the background at start-up (it yields to requests), and how many CPUs this process
may use.

Why one thread: libgomp, torch's OpenMP on Linux, cuts its spin-waits short once more threads are in
its teams than there are cores, and each thread that runs torch ops gets a team of its own. Decoding on
Gradio's worker threads did that: 19 tokens/s for one user where the same compiled decoder gives 35
alone (2-core Xeon). The main thread must then run no ops at 2 threads either (app.py's main() sets
it to 1)."""
import contextlib
import os
import sys
import threading
import time

import torch

from smollm2 import engine
from smollm2.batching import rows_of
from smollm2.errors import reason

CACHE_SIZES = (256, 512, 1024, 2048)  # KV cache slots a pass reads: the first that holds its tokens


def cache_sizes(context):
    """The KV cache sizes a pass reads (CACHE_SIZES below the context, then the context): one
    compiled graph each."""
    return tuple(s for s in CACHE_SIZES if s < context) + (context,)


class Warmup:
    """Builds the model's compiled decode step in a background thread at start-up, one graph per
    cache size, for one row of a Batcher's cache, so no request waits for torch.compile (15 s to 2 min
    per graph on 2 cores); then hands it to the Batcher (on_ready), which decodes a lone request
    through it. Until then, and whenever several requests share a step, they decode eagerly, the
    page says so.

    The build yields to requests. Tracing and compiling is Python that holds the GIL for its whole
    switch interval (5 ms) each time the decoder thread lets it go, and eager decoding lets it go
    around every op: a token waited for hundreds of such turns (1.0 tokens/s instead of about 30).
    So while a request runs (request()), the build pauses at its next Python call (a profile hook
    on its thread only) until none does. (A lower CPU priority, nice 19, was tried and dropped: on a
    machine shared with other busy processes it starved the build for over ten minutes.)"""

    def __init__(self, model, context, enabled, threads, request_limit, on_ready=None):
        self.model, self.context, self.sizes = model, context, cache_sizes(context)
        self.threads = threads  # the decoder's: Inductor builds its kernels for that many
        self.request_limit = request_limit  # seconds a request may hold the build back
        self.on_ready = on_ready  # on_ready(step, sizes) once every size is built
        self.enabled, self.ready, self.error, self.seconds = enabled, [], None, None
        self.done, self.idle, self.lock = threading.Event(), threading.Event(), threading.Lock()
        self.idle.set()
        self.active, self.deadline, self.paused_s = 0, 0.0, 0.0  # requests running; seconds paused for them
        if not enabled:
            self.done.set()
            return
        self.thread = threading.Thread(target=self.run, name="warmup", daemon=True)
        self.thread.start()

    @contextlib.contextmanager
    def request(self):
        """Around a request: the build waits while any runs (for at most the time limit of a request
        from the latest one's start: a request never closed must not stop the build for good)."""
        with self.lock:
            self.active += 1
            self.idle.clear()
            self.deadline = time.monotonic() + self.request_limit
        try:
            yield
        finally:
            with self.lock:
                self.active -= 1
                if not self.active:
                    self.idle.set()

    def yield_to_requests(self, *_):
        """The build thread's profile hook: wait (GIL released) while a request runs."""
        if not self.idle.is_set():
            t0 = time.monotonic()
            self.idle.wait(max(0.0, self.deadline - t0))
            self.paused_s += time.monotonic() - t0

    def run(self):
        start = time.perf_counter()
        try:
            sys.setprofile(self.yield_to_requests)  # this thread only
            torch.set_num_threads(self.threads)  # the decoder's: Inductor's kernels are built for it
            step, weight = engine.compiled_decode_step(self.model), self.model.lm_head.weight
            # a cache of one row shaped as a row of the Batcher's: the same strides, the same graphs
            cache = engine.KVCache(self.model.config, 1, self.context, weight.device, weight.dtype)
            with torch.inference_mode():  # as the Batcher runs it: the same guards
                for size in self.sizes:
                    zeros = torch.zeros((1, 1), dtype=torch.long, device=weight.device)
                    step(zeros, zeros, rows_of(cache, 0, 1, size))
                    self.ready.append(size)
            del cache
        except Exception as e:  # no C++ compiler, say: serve eagerly, correct and slower
            self.error = reason(e)
            engine.decode_eagerly(self.model)
            print(f"app.py: torch.compile of the decoder failed, decoding eagerly ({self.error})",
                  file=sys.stderr, flush=True)
        else:
            self.seconds = time.perf_counter() - start
            if self.on_ready:
                self.on_ready(step, self.sizes)
            print(f"app.py: compiled decoder ready for caches of {', '.join(map(str, self.sizes))} tokens "
                  f"in {self.seconds:.0f} s", file=sys.stderr, flush=True)
        finally:
            sys.setprofile(None)
            self.done.set()

    def compiled(self):
        """Whether a lone request decodes through the compiled step: once every size is built (no
        request then triggers a compilation, and none runs while one is under way)."""
        return self.enabled and self.done.is_set() and self.error is None

    def markdown(self):
        if not self.enabled:
            return ""
        if not self.done.is_set():
            ready = ", ".join(map(str, self.ready)) or "none yet"
            return (f"⏳ **Warming up:** {len(self.ready)} of {len(self.sizes)} cache sizes of the fast CPU "
                    f"decoder built (built: {ready}; all: {', '.join(map(str, self.sizes))}). The build "
                    f"pauses while you are answered: answers use the eager decoder until then.")
        if self.error:
            return f"Decoding eagerly: torch.compile is not available here ({self.error})."
        return (f"⚡ Fast CPU decoder ready (torch.compile, built in {self.seconds:.0f} s at start-up) for a lone "
                "request; requests that arrive together share eager batched steps.")


def install_gemv(model, threads):
    """engine.install_gemv (the C decode kernel at the batch sizes where it measured faster) measured
    on a thread of its own at the decoder's `threads`, before any build starts beside it: the
    figures are cached, and a build would skew them. Returns its log line (None: not on CPU)."""
    line = []

    def run():
        torch.set_num_threads(threads)
        line.append(engine.install_gemv(model))
    thread = threading.Thread(target=run, name="decode-kernel")
    thread.start()
    thread.join()
    return line[0] if line else None


def cpu_budget(cpu_max="/sys/fs/cgroup/cpu.max"):
    """CPUs this process may use: affinity, and the cgroup quota that containers (Spaces) set."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        with open(cpu_max) as f:
            quota, period = f.read().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, int(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return cpus
