"""What each of the benchmark's worker processes runs and times: one implementation's training steps
(Trainer), its greedy generation and the weight-streaming bound (Generator), each in a spawned
process of its own (Remote), so that each has its own peak memory and both implementations load
the same HF-format weights. bench/speed.py (the parent) makes them take turns and reports."""
import contextlib
import multiprocessing as mp
import platform
import statistics
import time
import traceback


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def onednn_available():
    """Whether oneDNN can take the fp32 CPU products here (x86 with torch's mkldnn)."""
    import torch
    return platform.machine().lower() in ("x86_64", "amd64") and torch.backends.mkldnn.is_available()


def _serve(conn, kind, init, keep_memory):
    """Worker main loop: build the object, then run the methods the parent asks for."""
    try:
        if keep_memory:  # train.py's own malloc setting, so that both run as train.py does
            from smollm2.speedups import keep_freed_memory
            keep_freed_memory()
        obj = {"train": Trainer, "gen": Generator}[kind](**init)
        conn.send(("ok", None))
        while True:
            method, kwargs = conn.recv()
            if method is None:
                return
            conn.send(("ok", getattr(obj, method)(**kwargs)))
    except Exception:
        conn.send(("error", traceback.format_exc()))


class Remote:
    """One implementation in its own process (spawned, so CUDA works and memory peaks are its own)."""

    def __init__(self, kind, keep_memory, **init):
        self.name = init["impl"]
        self.conn, child = mp.get_context("spawn").Pipe()
        self.proc = mp.get_context("spawn").Process(target=_serve, args=(child, kind, init, keep_memory),
                                                    daemon=True)
        self.proc.start()

    def ready(self):
        return self._answer()

    def __call__(self, method, **kwargs):
        self.conn.send((method, kwargs))
        return self._answer()

    def _answer(self):
        status, value = self.conn.recv()
        if status == "error":
            raise RuntimeError(f"{self.name} worker failed:\n{value}")
        return value

    def close(self):
        with contextlib.suppress(Exception):
            self.conn.send((None, None))
        self.proc.join(timeout=30)


def _setup(device, threads):
    import torch
    if device == "cpu":
        torch.set_num_threads(threads)
    else:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    import transformers
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    return torch


def _load(impl, weights, device, dtype):
    """Our SmolLM2 or transformers' LlamaForCausalLM from the same HF-format directory."""
    if impl.startswith("ours"):
        import model as ours
        model = ours.SmolLM2.from_pretrained(weights, dtype=dtype, device=device)
    else:
        from transformers import LlamaForCausalLM
        model = LlamaForCausalLM.from_pretrained(weights, dtype=dtype).to(device)
        model.generation_config.eos_token_id = None  # always 128 new tokens, as ours
        model.generation_config.pad_token_id = 0
    assert model.lm_head.weight is model.model.embed_tokens.weight, "embedding must be tied"
    return model


def _now(device):
    if device == "cuda":
        import torch
        torch.cuda.synchronize()
    return time.perf_counter()


def _rss_bytes(field="VmRSS"):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


class Trainer:
    """Training steps of one implementation: forward, backward, AdamW step."""

    def __init__(self, impl, weights, device, threads, batch_size, seq_len, compile, dtype="fp32",
                 gradient_checkpointing=False):
        torch = _setup(device, threads)
        self.impl, self.device, self.torch = impl, device, torch
        self.base_rss = _rss_bytes()  # Python, torch and transformers, no model yet
        model = _load(impl, weights, device, torch.float32).train()
        if gradient_checkpointing:  # ours only: model.py's flag, as train.py sets it
            model.gradient_checkpointing = True
        self.model, self.n_params = model, sum(p.numel() for p in model.parameters())
        from smollm2 import cpu_paths, devices, speedups
        from smollm2.chunked_loss import ChunkedLoss  # ours: the loss as train.py computes it, no (B, T, V) logits
        if impl.startswith("ours"):  # as train.py installs them (the malloc setting is _setup's); "ours-mkl"
            # and "ours-onednn": the fp32 CPU products forced onto one library, ours: cpu_paths' choice
            gemm = {"ours-mkl": "mkl", "ours-onednn": "onednn"}.get(impl) or (
                cpu_paths.choose(model.config, batch_size * seq_len)["route"]
                if device == "cpu" and dtype == "fp32" and cpu_paths.onednn_available() else "mkl")
            speedups.install(model, device, dtype, compile, training=True, keep_memory=False, gemm=gemm)
        self.fwd = ChunkedLoss(model) if impl.startswith("ours") else model
        if compile and device == "cpu" and impl.startswith("ours"):
            devices.deterministic_mode("cpu")  # as train.py compiles it
        decay = [p for p in model.parameters() if p.dim() >= 2]
        other = [p for p in model.parameters() if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}]
        try:  # fused AdamW (CPU too since torch 2.4), the same optimizer for both implementations
            self.opt = torch.optim.AdamW(groups, lr=3e-4, betas=(0.9, 0.95), fused=True)
        except (RuntimeError, TypeError):
            self.opt = torch.optim.AdamW(groups, lr=3e-4, betas=(0.9, 0.95))
        self.fwd = torch.compile(self.fwd) if compile else self.fwd
        self.autocast = devices.autocast(device, dtype)  # no GradScaler in fp16: timing, not training
        self.low = None
        if impl in ("ours", "ours-eager") and speedups.use_weight_copy(device, dtype, compile,
                                                                             gradient_checkpointing):
            # as train.py trains in bf16 on CPU: a bf16 weight copy, no autocast
            self.fwd = self.low = speedups.LowPrecisionWeights(self.fwd, self.opt)  # its hooks keep it in step
            self.autocast = contextlib.nullcontext()
        self.peak_reset = False
        self.shape(batch_size, seq_len)

    def shape(self, batch_size, seq_len):
        g = self.torch.Generator().manual_seed(0)
        x = self.torch.randint(0, self.model.config.vocab_size, (batch_size, seq_len + 1), generator=g)
        self.idx, self.targets = x[:, :-1].to(self.device), x[:, 1:].to(self.device)

    def reset_peak(self):
        """Forget the loading's memory peak: measure from here (weights in memory, nothing else)."""
        if self.device == "cuda":
            self.torch.cuda.reset_peak_memory_stats()
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM, the peak resident set, to the current one
            self.peak_reset = True
        except OSError:
            pass

    def step(self):
        """Seconds for one full training step."""
        t0 = _now(self.device)
        with self.autocast:
            if self.impl.startswith("ours"):  # chunked loss: no (B, T, V) logits
                loss = self.fwd(self.idx, self.targets)
            else:  # transformers shifts the labels itself: same inputs, same compute
                loss = self.fwd(input_ids=self.idx, labels=self.idx).loss
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return _now(self.device) - t0

    def flops_per_token(self, seq_len):
        """6N + 12*L*d*T (ours only: model.flops_per_token)."""
        from model import flops_per_token
        return flops_per_token(self.model.config, seq_len, self.n_params)

    def matmul_peak(self, n=2048, reps=5, dtype="fp32"):
        """FLOP/s of an (n, n) @ (n, n) product, the best this CPU does, median of reps. fp32: through
        MKL (what torch's matmul calls) and through oneDNN (smollm2.speedups.matmul_nt); bf16: torch's matmul
        (oneDNN's AMX / AVX-512 bf16 kernels)."""
        from smollm2.speedups import onednn_matmul_nt
        torch = self.torch
        a, b = torch.randn(n, n), torch.randn(n, n)
        out = {}
        if dtype == "bf16":
            a, b = a.bfloat16(), b.bfloat16()
            routes = (("bf16", lambda: a @ b.t()),)
        else:
            routes = (("mkl", lambda: a @ b.t()), ("onednn", lambda: onednn_matmul_nt(a, b)))
        for name, fn in routes:
            if name == "onednn" and not onednn_available():
                continue
            times = []
            for _ in range(reps + 2):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            out[name] = 2 * n ** 3 / median(times[2:])
        return out

    def peak_memory(self):
        """Peak bytes while training: weights, gradients, optimizer state and activations."""
        if self.device == "cuda":
            return {"peak_bytes": self.torch.cuda.max_memory_allocated(), "what": "torch.cuda.max_memory_allocated"}
        return {"peak_bytes": _rss_bytes("VmHWM") - self.base_rss,
                "what": "peak RSS minus the RSS before loading the model"
                        + ("" if self.peak_reset else " (peak includes loading)")}


class Generator:
    """Greedy generation of one implementation, batch 1; also the weight-streaming bound."""

    def __init__(self, impl, weights, device, threads, dtype, prompt):
        torch = _setup(device, threads)
        self.impl, self.device, self.torch = impl, device, torch
        self.model = _load(impl, weights, device, getattr(torch, dtype)).eval()
        self.prompt = prompt

    def generate(self, max_new_tokens, compile=False):
        """{'ttft': s, 'total': s, 'tokens': [...]} for one greedy generation."""
        torch = self.torch
        t0 = _now(self.device)
        first = None
        if self.impl == "ours":
            from smollm2 import engine
            tokens = []
            for token in engine.generate_stream(self.model, self.prompt, max_new_tokens, compile=compile):
                tokens.append(token)  # an int: the step has finished
                first = first or _now(self.device)
        else:
            streamer = _first_token_timer(self.device)
            ids = torch.tensor([self.prompt], device=self.device)
            with torch.inference_mode():
                out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                          do_sample=False, streamer=streamer)
            tokens, first = out[0, len(self.prompt):].tolist(), streamer.first
        total = _now(self.device) - t0
        return {"ttft": first - t0, "total": total, "tokens": tokens}

    def stream_weights(self):
        """Seconds to read every weight once (the tied embedding once): what one token of a purely
        memory-bound decoder costs. A sum reads each element once and writes nothing. On CPU the
        median of 9 passes: a single bf16 pass moved between 8.1 and 14.5 ms from round to round
        on a noisy 2-core VM, while the generation it is compared with spans 128 tokens."""
        params = [p.detach() for p in self.model.parameters()]
        if self.device == "cuda":  # one sum per tensor would time kernel launches, not memory
            reps = 20
            t0 = _now(self.device)
            for _ in range(reps):
                self.torch._foreach_norm(params, 1)
            return (_now(self.device) - t0) / reps
        passes = []
        for _ in range(9):
            t0 = _now(self.device)
            for p in params:
                p.sum()
            passes.append(_now(self.device) - t0)
        return statistics.median(passes)

    def weight_bytes(self):
        return sum(p.numel() * p.element_size() for p in self.model.parameters())


def _first_token_timer(device):
    """A transformers streamer that notes when generate hands over its first new token."""
    from transformers.generation.streamers import BaseStreamer

    class FirstTokenTimer(BaseStreamer):
        def __init__(self):
            self.calls, self.first = 0, None

        def put(self, value):  # called with the prompt, then with each new token
            self.calls += 1
            if self.calls == 2:
                self.first = _now(device)

        def end(self):
            pass
    return FirstTokenTimer()
