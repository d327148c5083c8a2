"""Generation with a KV cache: what sample.py, train.py's samples and the Space call. model.py keeps
the model and a plain reference `generate`; here are the KV cache, HF's sampling controls, streaming
with stop tokens, and the compiled decode step with its CPU decode kernel.

    from smollm2 import engine
    for token in engine.generate_stream(model, ids, 64, temperature=0.8, top_k=50, compile=True): ...

The cache holds a batch of sequences, each at its own length, so that several requests can share
one decode step; generate_stream decodes one sequence.
"""
import functools
import warnings
import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F

from smollm2 import cpu_paths, gemv
from smollm2.speedups import linear_as, swap_modules


class KVCache:
    """Keys and values of every layer for B sequences, allocated once and filled in place. Slot p of a
    row holds its token at position p; lengths (B,) counts each row's filled slots, and a forward pass
    continues every row where it stands (model.hidden_states)."""

    def __init__(self, config, batch_size, size, device, dtype):
        shape = (batch_size, config.num_key_value_heads, size, config.head_dim)
        # one tensor per layer: a compiled step then updates each in place, not a copy of all of them
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)
        self.size = size

    def update(self, layer_idx, k, v, positions):
        """Store k, v (B, nkv, T, hs) at positions (B, T); return all of the layer's slots, (B, nkv, S, hs)."""
        index = positions[:, None, :, None].expand_as(k)  # (B, nkv, T, hs): slot of each value
        self.k[layer_idx].scatter_(2, index, k)
        self.v[layer_idx].scatter_(2, index, v)
        return self.k[layer_idx], self.v[layer_idx]


def decode_step(model, idx, positions, cache):
    """Logits (B, V) of one new token per row, idx (B, 1) at positions (B, 1), attending to every cache
    slot up to it. Shapes never change, so one compiled graph serves a whole generation."""
    mask = torch.arange(cache.size, device=idx.device) <= positions[..., None]  # (B, 1, S)
    return model.lm_head(model.trunk(idx, positions, mask[:, None], cache)[:, -1])


# ----------------------------------------------------------------------------- sampling
def sample(scores, temperature=0.0, top_k=None, top_p=None, generator=None):
    """One token id from 1-D logits, with HF's top-k (ties kept) then top-p (>= 1 token kept). After
    top-k the rest works on its candidates only: a batch of 8 requests sorted the whole vocabulary
    8 times a step, a sixth of a CPU decode step's time."""
    if not temperature or temperature <= 0:
        return int(scores.argmax())
    scores, ids = scores / temperature, None
    if top_k is not None and 0 < top_k < scores.numel():
        kth = torch.topk(scores, top_k).values[-1]
        ids = torch.nonzero(scores >= kth)[:, 0]  # the candidates, ties with the k-th kept
        scores = scores[ids]
    if top_p is not None and top_p < 1.0:
        sorted_scores, order = torch.sort(scores)  # ascending
        cum = sorted_scores.softmax(-1).cumsum(-1)
        drop = cum <= 1 - top_p
        drop[-1] = False  # always keep the most likely token
        scores = scores.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    token = int(torch.multinomial(scores.softmax(-1), 1, generator=generator))
    return int(ids[token]) if ids is not None else token


def penalise(scores, seen, repetition_penalty):
    """HF's repetition penalty: the logits of tokens already seen divided by it (multiplied if < 0)."""
    if repetition_penalty == 1.0:
        return scores
    penalised = torch.where(scores < 0, scores * repetition_penalty, scores / repetition_penalty)
    return torch.where(seen, penalised, scores)


# ----------------------------------------------------------------------------- generation
def cache_size(model, n_prompt, max_new_tokens, compile, cache_len):
    """KV cache slots for a generation: cache_len, else prompt + new tokens, rounded up to 256 with
    compile (other prompt lengths then reuse the compiled graph); the context window at most."""
    size = cache_len or n_prompt + max_new_tokens
    if compile and not cache_len:
        size = -(-size // 256) * 256
    return min(model.config.max_position_embeddings, size)


@torch.inference_mode()
def generate_stream(model, prompt, max_new_tokens=128, temperature=0.0, top_k=None, top_p=None,
                    repetition_penalty=1.0, eos_token_id=None, generator=None, compile=False, cache_len=None):
    """Yield new token ids one at a time. prompt: a list or 1-D tensor of ids (one sequence).

    Sampling follows HF's generate: repetition penalty, then temperature, top-k, top-p; temperature 0
    is greedy. A prompt longer than the cache (the window at most) keeps its last tokens; when the
    cache fills up, it restarts from the last half of the text. compile=True decodes each new token
    through compiled_decode_step: several times faster on CPU after a one-off compilation (kept for
    later calls; Inductor caches it on disk); if compiling fails, it warns and decodes eagerly.
    cache_len: the KV cache's slots (default: see cache_size), each size a compiled graph of its own."""
    device = model.lm_head.weight.device
    ids = torch.as_tensor(prompt, dtype=torch.long, device=device).view(-1)
    if ids.numel() == 0:
        raise ValueError("prompt is empty: give at least one token")
    size = cache_size(model, ids.numel(), max_new_tokens, compile, cache_len)
    ids = ids[-(size - 1):]  # leave room for at least one new token
    seen = torch.zeros(model.config.vocab_size, dtype=torch.bool, device=device)
    seen[ids] = True
    cache = KVCache(model.config, 1, size, device, model.lm_head.weight.dtype)
    step = compiled_decode_step(model) if compile else None
    logits = model.lm_head(model.hidden_states(ids[None], cache)[:, -1])  # the prompt: (1, V)
    for _ in range(max_new_tokens):
        token = sample(penalise(logits[0].float(), seen, repetition_penalty), temperature, top_k, top_p, generator)
        yield token
        if eos_token_id is not None and token == eos_token_id:
            return
        seen[token] = True
        ids = torch.cat((ids, ids.new_tensor([token])))
        if int(cache.lengths[0]) == size:  # cache full: restart from the last half of the text
            ids = ids[-(size // 2):]
            cache.lengths.zero_()
            logits = model.lm_head(model.hidden_states(ids[None], cache)[:, -1])
        else:
            logits, step = next_logits(model, step, ids[-1:][None], cache)


def next_logits(model, step, idx, cache):
    """(logits (B, V), step) of the tokens idx (B, 1) through the compiled step, or eagerly where step
    is None; a compiled step that fails warns, and this model decodes eagerly from then on."""
    positions = cache.lengths[:, None].clone()  # (B, 1)
    if step is not None:
        try:
            logits = step(idx, positions, cache)
        except Exception as e:  # no C++ compiler, unsupported platform...: stay correct, just slower
            warnings.warn(f"torch.compile of the decode step failed ({type(e).__name__}: {e}); "
                          "generating in eager mode")
            decode_eagerly(model)
            step = None
    if step is None:
        logits = decode_step(model, idx, positions, cache)
    cache.lengths += 1
    return logits, step


def generate(model, prompt, max_new_tokens=128, **kwargs):
    """All new token ids at once, as a list (see generate_stream for the arguments)."""
    return list(generate_stream(model, prompt, max_new_tokens, **kwargs))


# ----------------------------------------------------------------------------- compiled decoding
COMPILED = weakref.WeakKeyDictionary()  # model -> its compiled decode step, or None once it failed
CPU_OPTIONS = {"realize_opcount_threshold": 4, "size_asserts": False}  # Inductor's, on CPU (below)
DICT_TAGS = True  # Dynamo's recursive dict tags for the step's guards (below)


def compiled_decode_step(model):
    """decode_step through torch.compile, built once per model; None once compiling has failed.
    On CPU, with the decode kernel below, and two Inductor options: each RMSNorm is computed once,
    not again in every weight row's loop (realize_opcount_threshold), and the wrapper skips input
    shape checks that Dynamo's guards already make (size_asserts). Dynamo's recursive dict tags skip
    re-checking the modules' unchanged attribute dicts before each token; weights changed later (new
    values, a dtype, a new Parameter) still count. Each is a measured gain (docs/performance.md)."""
    if model not in COMPILED:
        cpu = model.lm_head.weight.device.type == "cpu"
        if cpu:
            install_decode_kernels(model)
        options = dict(CPU_OPTIONS) if cpu else None
        step = torch.compile(functools.partial(decode_step, model), dynamic=False, fullgraph=True, options=options)
        if DICT_TAGS and hasattr(torch._dynamo.config, "use_recursive_dict_tags_for_guards"):  # not in older torch
            step = torch._dynamo.config.patch(use_recursive_dict_tags_for_guards=True)(step)
        COMPILED[model] = step
    return COMPILED[model]


def decode_eagerly(model):
    """Give up the compiled decode step of model (building it failed): generation decodes eagerly."""
    COMPILED[model] = None


# Decoding multiplies one vector per sequence by every weight matrix: the time is that of reading the
# weights. MKL runs that one-row GEMM well below the memory bandwidth; written as a broadcast product
# and a sum, Inductor emits one streaming reduction over the weight rows that runs at the bandwidth
# (docs/performance.md). Eager, both keep torch's kernels (the product would be materialised).
class StreamingLinear(nn.Linear):
    """nn.Linear (no bias) whose one-row products, compiled, are a product and a sum over the weight's
    rows; in bf16 written in fp32 (as F.linear accumulates), rounded to bf16 once. Eager, the products
    of batch sizes in kernel_rows go through smollm2/gemv.py's kernel (install_gemv)."""
    kernel_rows = frozenset()

    def forward(self, x):
        if torch.compiler.is_compiling():
            if x.shape[:-1].numel() == 1:
                product = x.unsqueeze(-2).float() * self.weight.float()  # (..., 1, C) * (N, C)
                return product.sum(-1).to(x.dtype)  # (..., N)
        elif x.shape[:-1].numel() in self.kernel_rows and gemv.fits(x, self.weight):
            return gemv.linear(x, self.weight)
        return F.linear(x, self.weight)


def install_decode_kernels(model):
    """Give model's linear layers the compiled CPU decode kernel above (the same weights; eager
    forward passes unchanged). Returns how many modules it swapped. (Attention keeps model.py's SDPA:
    a fused one-query attention measured no faster, docs/performance.md.)"""
    return swap_modules(model, nn.Linear, linear_as(StreamingLinear))


def kernel_at(model, rows):
    """Eager products of the batch sizes in rows through smollm2/gemv.py's kernel, in every
    StreamingLinear of model (install_decode_kernels); F.linear at the others."""
    for layer in model.modules():
        if isinstance(layer, StreamingLinear):
            layer.kernel_rows = frozenset(rows)


def install_gemv(model, sizes=(1, 2, 4, 8), path=None):
    """Decode eager steps of model on CPU through smollm2/gemv.py's kernel at the batch sizes where it
    measured faster than F.linear, in decode steps of this model on this machine (cached per machine,
    shapes, dtype and threads). Returns a line for the start-up log."""
    weight = model.lm_head.weight
    if weight.device.type != "cpu" or weight.dtype not in (torch.float32, torch.bfloat16):
        return None
    if gemv.build() is None:
        return f"decode products: F.linear (the C kernel could not be built: {gemv.LIBRARY['error']})"
    install_decode_kernels(model)
    size = min(256, model.config.max_position_embeddings)  # a short conversation's cache, half full
    caches = {n: KVCache(model.config, n, size, weight.device, weight.dtype) for n in sizes}

    @torch.inference_mode()
    def step(n, kernel):
        kernel_at(model, sizes if kernel else ())
        caches[n].lengths.fill_(size // 2)
        decode_step(model, torch.zeros((n, 1), dtype=torch.long), caches[n].lengths[:, None].clone(), caches[n])

    c = model.config
    key = (f"decode kernel {gemv.LIBRARY['digest']} | {cpu_paths.machine_key()} | layers {c.num_hidden_layers}, "
           f"hidden {c.hidden_size}, mlp {c.intermediate_size}, vocab {c.vocab_size}, {weight.dtype}, "
           f"{torch.get_num_threads()} threads")
    try:
        figures, won = gemv.choose(step, key, sizes, path=path)
    except Exception as e:  # a step through the kernel failed: decode through F.linear
        kernel_at(model, ())
        return f"decode products: F.linear (a decode step through the C kernel failed: {type(e).__name__}: {e})"
    nearest = {n: next(s for s in sorted(sizes) if s >= n) for n in range(1, max(sizes) + 1)}  # 3 rows: as 4
    kernel_at(model, {n for n, size in nearest.items() if size in won})
    ratios = ", ".join(f"{n}: {t / k:.2f}x" for n, (t, k) in sorted(figures.items(), key=lambda kv: int(kv[0])))
    return (f"decode products: the C kernel at {sorted(won) or 'no'} rows, F.linear elsewhere (the kernel's "
            f"speed against F.linear by rows, decode steps of this model on this machine: {ratios})")
