"""Continuous batching: several requests decode together, one token each per forward pass, joining and
leaving the running batch at token boundaries (as vLLM, TGI and llama.cpp's server slots do).

A decode step is bound by reading the weights (540 MB in fp32 for the 135M model): one step for eight
requests reads them once, where eight steps for one request each read them eight times. So:
- the KV cache (engine.KVCache) has one row per slot, each at its own length;
- a new request takes a free slot and its prompt is read (prefilled) between decode steps, a chunk
  at a time, so that a long prompt holds the others back by about one step per chunk; requests that
  arrive together read theirs in the same passes;
- every step decodes each request that has read its prompt, its next token at its own position;
- each request samples with its own settings and random generator (the same seed gives the same
  answer alone or batched) and stops at its own stop tokens, its token limit, a full context, or
  when its reader goes away (close()), leaving its slot to the next request at once.

    batcher = Batcher(model, slots=8, context=2048)
    request = batcher.submit(ids, 64, temperature=0.7, seed=1, stop_ids={eos})
    for token in request.tokens(): ...          # from any thread; Batcher.start() runs the steps
    generate_batch(model, [ids_a, ids_b], 64)   # several prompts at once, no thread
"""
import collections
import queue
import threading
import time

import torch

from smollm2.engine import KVCache, decode_step, penalise, sample

PREFILL_CHUNK = {"cpu": 32, "cuda": 512}  # prompt tokens read per step, about a decode step's time on CPU
IDLE_CHUNKS = 16  # while no request decodes, a pass reads up to this many chunks: nobody waits on it


def prefill_chunk(device_type):
    """Prompt tokens read between two decode steps: on a 2-core CPU 32 tokens of the 135M model take
    about one batched decode step's time; a GPU reads 512 in less than a step's launches."""
    return PREFILL_CHUNK.get(device_type, PREFILL_CHUNK["cpu"])


def kv_cache_bytes(config, slots, context, dtype):
    """Bytes of a KV cache of `slots` rows of `context` tokens: keys and values of every layer."""
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * config.num_hidden_layers * slots * config.num_key_value_heads * context * config.head_dim * element


def rows_of(cache, start, stop, size=None):
    """A KVCache over rows start..stop-1 of cache and its first `size` slots (default all): views, so
    what a pass writes lands in cache, and attention reads only the slots in use."""
    size = size or cache.size
    view = object.__new__(KVCache)
    view.k, view.v = [k[start:stop, :, :size] for k in cache.k], [v[start:stop, :, :size] for v in cache.v]
    view.lengths, view.size = cache.lengths[start:stop], size
    return view


class Request:
    """One generation: its prompt, its settings, and the queue its tokens go out on (None ends it)."""

    def __init__(self, ids, max_new_tokens, temperature=0.0, top_k=None, top_p=None, repetition_penalty=1.0,
                 seed=None, stop_ids=(), device="cpu", vocab_size=None):
        self.ids, self.max_new_tokens, self.stop_ids = list(ids), max_new_tokens, set(stop_ids)
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.repetition_penalty = repetition_penalty
        self.generator = torch.Generator(device).manual_seed(seed) if seed is not None else None
        self.device, self.vocab_size, self.seen = device, vocab_size, None  # seen: made by start()
        self.out, self.closed, self.slot, self.read, self.made = queue.SimpleQueue(), False, None, 0, 0
        self.length = 0  # tokens of it in the cache
        self.deadline = float("inf")
        self.paths = collections.Counter()  # decode steps it took by path: compiled, eager, batched eager
        self.next_token = None  # sampled, not yet in the cache
        self.admitted = None  # its place in the order of admission to a slot

    def start(self):
        """On the batcher's thread: the tensors of the request. No torch op runs on the caller's thread:
        a thread that runs one gets an OpenMP team of its own (a 49,152-token mask is filled in
        parallel), and with more team threads than cores libgomp cuts its spin-waits short: decoding
        fell from 23 to 15 tokens/s in the Space on 2 cores."""
        self.seen = torch.zeros(self.vocab_size, dtype=torch.bool, device=self.device)
        self.seen[torch.tensor(self.ids, device=self.device)] = True

    def tokens(self, poll=None):
        """Yield the new token ids as they come; with poll (seconds), None whenever that long passes
        without one (a page can then say where the request waits). Closing this generator (the
        reader went away, a Stop button) frees the request's slot at the batcher's next step."""
        try:
            while True:
                try:
                    token = self.out.get(timeout=poll)
                except queue.Empty:
                    yield None
                    continue
                if isinstance(token, Exception):
                    raise token
                if token is None:
                    return
                yield token
        finally:
            self.closed = True

    def close(self):
        self.closed = True


class Batcher:
    """The running batch: `slots` KV cache rows of `context` tokens, the requests in them and those
    waiting for one. step() does one round (admit, read one prompt chunk, one decode step for all);
    start() runs rounds on a thread of its own until the process ends."""

    def __init__(self, model, slots=8, context=None, chunk=None, sizes=None, cache_sizes=None, time_limit=None):
        """sizes: the batch sizes a decode step pads to (a compiled step's graphs; None: no padding);
        cache_sizes: the cache lengths a pass reads, the first that holds every row's tokens (None:
        the whole context); time_limit: seconds after which a request ends even if nobody reads it."""
        weight = model.lm_head.weight
        self.model, self.slots, self.device = model, slots, weight.device
        self.context = min(context or model.config.max_position_embeddings, model.config.max_position_embeddings)
        self.chunk, self.time_limit = chunk or prefill_chunk(self.device.type), time_limit
        self.cache = KVCache(model.config, slots, self.context, self.device, weight.dtype)
        self.step_fn = lambda idx, positions, cache: decode_step(model, idx, positions, cache)
        self.compiled = None  # set_compiled: a compiled one-row step and the cache sizes it is built for
        self.sizes = sorted(sizes) if sizes else None
        self.cache_sizes = sorted(cache_sizes or ()) + [self.context]
        self.waiting, self.running = collections.deque(), {}  # slot -> Request
        self.inbox, self.wake = queue.SimpleQueue(), threading.Event()
        self.steps, self.admitted = 0, 0  # decode steps run; requests admitted

    def set_compiled(self, step, cache_sizes):
        """From now on a decode step of one row whose tokens fit one of cache_sizes runs step (a
        compiled decode step built for rows of this cache at those sizes); any other runs eagerly."""
        self.compiled = (step, set(cache_sizes))

    # ------------------------------------------------------------------ from any thread
    def submit(self, ids, max_new_tokens, temperature=0.0, top_k=None, top_p=None, repetition_penalty=1.0,
               seed=None, stop_ids=()):
        """Queue a request (ids: its prompt, which must leave room for one new token); returns it."""
        if not 0 < len(ids) < self.context:
            raise ValueError(f"a prompt of {len(ids)} tokens: give 1 to {self.context - 1}")
        request = Request(ids, max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, stop_ids,
                          self.device, self.model.config.vocab_size)
        if self.time_limit is not None:
            request.deadline = time.monotonic() + self.time_limit
        self.inbox.put(request)
        self.wake.set()
        return request

    def position(self, request):
        """How many requests wait ahead of this one for a slot (0 once it has one)."""
        if request.slot is not None or request.closed:  # running, or done
            return 0
        waiting = list(self.waiting)
        return waiting.index(request) if request in waiting else len(waiting)

    def start(self, threads=None):
        def run():
            if threads:
                torch.set_num_threads(threads)
            while True:
                self.wake.clear()
                if not self.step():
                    self.wake.wait(0.5)  # idle until a request comes
        threading.Thread(target=run, name="batcher", daemon=True).start()
        return self

    def drive(self, request):
        """Yield request's tokens, running the steps on this thread (no start()): for a device that
        is there only during the caller's call (a ZeroGPU Space)."""
        try:
            while True:
                busy = self.step()
                while not request.out.empty():
                    token = request.out.get()
                    if token is None:
                        return
                    if isinstance(token, Exception):
                        raise token
                    yield token
                if not busy:
                    return
        finally:
            request.close()

    # ------------------------------------------------------------------ on the batcher's thread
    @torch.inference_mode()
    def step(self):
        """One round; returns whether any request is waiting or running after it."""
        self.admit()
        try:
            self.compact()
            self.read_prompt()
            self.decode()
        except Exception as e:  # the model's error: every request in the batch gets it, the batcher goes on
            for slot in list(self.running):
                self.finish(slot, e)
        return bool(self.running or self.waiting)

    def admit(self):
        """New requests join the queue; requests closed by their readers leave; free slots fill."""
        while not self.inbox.empty():
            self.waiting.append(self.inbox.get())
        now = time.monotonic()
        for request in list(self.waiting) + list(self.running.values()):
            if now > request.deadline:  # nobody has read it for too long: a client gone without closing
                request.closed = True
        for slot, request in list(self.running.items()):
            if request.closed:
                self.finish(slot)
        self.waiting = collections.deque(r for r in self.waiting if not r.closed)
        free = sorted(set(range(self.slots)) - set(self.running))  # the lowest first: the batch stays short
        while free and self.waiting:
            request, slot = self.waiting.popleft(), free.pop(0)
            request.slot, request.admitted = slot, self.admitted
            self.admitted += 1
            request.start()
            self.cache.lengths[slot] = 0
            self.running[slot] = request

    def compact(self):
        """Move the request in the highest slot to the lowest free one (its cache row copied) until the
        requests fill slots 0..n-1: a decode step computes every row up to the highest in use, so two
        requests left in slots 5 and 7 would cost a step of 8 rows."""
        while self.running and max(self.running) >= len(self.running):
            top = max(self.running)
            free = min(set(range(top)) - set(self.running))
            request, n = self.running.pop(top), int(self.cache.lengths[top])
            for layer in self.cache.k + self.cache.v:
                layer[free, :, :n] = layer[top, :, :n]
            self.cache.lengths[free], self.cache.lengths[top] = n, 0
            request.slot = free
            self.running[free] = request

    def read_prompt(self):
        """The next part of the prompts still being read, in one pass over a run of neighbouring slots
        (requests that arrive together take neighbouring slots), the earliest admitted one's: a chunk
        of each while other requests decode (they wait for it), IDLE_CHUNKS chunks in all while none
        does; as many tokens from each row (a row with fewer left is padded; the padding lands in
        slots past that row's length, which its own next tokens overwrite before anything reads
        them). A request whose prompt ends in it gets its first token."""
        reading = {r.slot: r for r in self.running.values() if r.read < len(r.ids)}
        if not reading:
            return
        lo = hi = min(reading.values(), key=lambda r: r.admitted).slot
        while lo - 1 in reading:
            lo -= 1
        while hi + 1 in reading:
            hi += 1
        run = [reading[slot] for slot in range(lo, hi + 1)]
        decoding = any(r.next_token is not None for r in self.running.values())
        t = self.chunk if decoding else self.chunk * IDLE_CHUNKS // len(run)  # 8 x 55 tokens: 5x faster at once
        t = max(1, min(t, max(len(r.ids) - r.read for r in run),
                       min(self.context - r.read for r in run)))  # no row may write past the context
        parts = [r.ids[r.read:r.read + t] for r in run]
        idx = torch.tensor([part + [0] * (t - len(part)) for part in parts], device=self.device)
        size = self.cache_size(max(r.read for r in run) + t)
        hidden = self.model.hidden_states(idx, rows_of(self.cache, lo, hi + 1, size))
        for r, part in zip(run, parts):
            r.read += len(part)
            r.length = r.read
            self.cache.lengths[r.slot] = r.read  # the pass added t to every row
        done = [(i, len(part) - 1) for i, (r, part) in enumerate(zip(run, parts)) if r.read == len(r.ids)]
        if done:
            rows, last = zip(*done)
            logits = self.model.lm_head(hidden[list(rows), list(last)])
            for row, scores in zip(rows, logits):
                self.emit(run[row], scores)

    def decode(self):
        """One decode step for every request whose next token is sampled: rows 0..n of the cache (n
        the highest such slot; rows between that are idle or still reading a prompt write a dummy
        token where their next one will go, and their lengths stay)."""
        ready = {slot: r for slot, r in self.running.items() if r.next_token is not None}
        if not ready:
            return
        n = self.rows(max(ready) + 1)
        # every row in the step writes at its length: those still reading a prompt may be the longest
        size = self.cache_size(max(r.length for slot, r in self.running.items() if slot < n) + 1)
        tokens = [0] * n
        for slot, request in ready.items():
            tokens[slot] = request.next_token
        idx = torch.tensor(tokens, device=self.device)[:, None]
        step, path = self.step_fn, "eager" if n == 1 else "batched eager"
        if self.compiled and n == 1 and size in self.compiled[1]:
            step, path = self.compiled[0], "compiled"
        logits = step(idx, self.cache.lengths[:n, None].clone(), rows_of(self.cache, 0, n, size))
        self.steps += 1
        for slot, request in ready.items():
            self.cache.lengths[slot] += 1
            request.length += 1
            request.paths[path] += 1
            self.emit(request, logits[slot])

    def cache_size(self, tokens):
        """The cache slots a pass reads: the first of cache_sizes that holds `tokens`."""
        return next(size for size in self.cache_sizes if size >= tokens)

    def rows(self, n):
        """Rows of a decode step that must reach row n - 1: n, or the next of `sizes` (a compiled step
        has one graph per batch size)."""
        return next((size for size in self.sizes if size >= n), n) if self.sizes else n

    def emit(self, request, logits):
        """Sample the request's next token from its logits and send it; finish the request if done."""
        token = sample(penalise(logits.float(), request.seen, request.repetition_penalty), request.temperature,
                       request.top_k, request.top_p, request.generator)
        request.out.put(token)
        request.made += 1
        request.seen[token] = True
        full = request.length >= self.context  # no slot left for this token
        if token in request.stop_ids or request.made >= request.max_new_tokens or full or request.closed:
            self.finish(request.slot)
        else:
            request.next_token = token

    def finish(self, slot, error=None):
        request = self.running.pop(slot)
        self.cache.lengths[slot] = 0  # an idle row in a decode step writes and reads its first slot only
        request.out.put(error)  # None: the end
        request.next_token, request.slot = None, None
        request.closed = True


def generate_batch(model, prompts, max_new_tokens=128, slots=None, **sampling):
    """The new token ids of each prompt (lists of ids), generated together through a Batcher on this
    thread (no more at once than slots, default all), each ending at a stop id (included), after
    max_new_tokens, or when the context window is full. sampling: temperature, top_k, top_p,
    repetition_penalty, seed (each prompt's generator starts from it), stop_ids."""
    context = min(model.config.max_position_embeddings, max(len(p) for p in prompts) + max_new_tokens + 1)
    batcher = Batcher(model, slots or len(prompts), context)
    # a prompt longer than the window keeps its last tokens, as engine.generate_stream's
    requests = [batcher.submit(p[-(context - 1):], max_new_tokens, **sampling) for p in prompts]
    while batcher.step():
        pass
    out = []
    for request in requests:
        tokens = []
        while (token := request.out.get()) is not None:
            if isinstance(token, Exception):
                raise token
            tokens.append(token)
        out.append(tokens)
    return out

