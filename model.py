"""SmolLM2-135M in one readable file: config, model, KV-cache generation (smollm2/weights.py reads
and writes its files).

The architecture is Llama (as in Hugging Face's models/llama/modeling_llama.py, our numerical
oracle): pre-norm RMSNorm, grouped-query attention with half-split RoPE, a SwiGLU MLP, no biases
and the input embedding tied to the LM head. Parameter names are HF's verbatim, so an HF state dict
loads with strict=True and no key map. References: SmolLM2 (arXiv:2502.02737), Llama
(arXiv:2302.13971), RoPE (arXiv:2104.09864), GQA (arXiv:2305.13245), nanoGPT for the layout.
"""
import math
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint


@dataclass
class SmolLM2Config:
    # https://huggingface.co/HuggingFaceTB/SmolLM2-135M/blob/main/config.json
    vocab_size: int = 49152  # GPT-2 style byte-level BPE; id 0 is <|endoftext|>
    hidden_size: int = 576  # d_model, the width of the residual stream
    intermediate_size: int = 1536  # hidden width of the SwiGLU MLP
    num_hidden_layers: int = 30  # transformer blocks
    num_attention_heads: int = 9  # query heads
    num_key_value_heads: int = 3  # key/value heads shared by groups of 3 query heads (GQA)
    max_position_embeddings: int = 8192  # context window
    rope_theta: float = 100000.0  # RoPE base frequency
    rms_norm_eps: float = 1e-5  # epsilon inside every RMSNorm
    initializer_range: float = 1 / math.sqrt(576)  # std of the normal init (HF: 0.0417)
    bos_token_id: int = 0  # <|endoftext|> begins and ends documents in the base model
    eos_token_id: int = 0

    @property
    def head_dim(self):
        return self.hidden_size // self.num_attention_heads

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if f.type in (int, float, "int", "float") and not v > 0 and not f.name.endswith("token_id"):
                raise ValueError(f"config: {f.name} must be positive, got {v}")
        if self.hidden_size % self.num_attention_heads or self.head_dim % 2:
            raise ValueError(f"config: hidden_size {self.hidden_size} must split into "
                             f"{self.num_attention_heads} heads of even size")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"config: {self.num_attention_heads} query heads do not split into "
                             f"{self.num_key_value_heads} key/value groups")


PRESETS = {
    "smollm2-135m": SmolLM2Config(),
    # https://huggingface.co/HuggingFaceTB/SmolLM2-360M/blob/main/config.json
    "smollm2-360m": SmolLM2Config(hidden_size=960, intermediate_size=2560, num_hidden_layers=32,
                                  num_attention_heads=15, num_key_value_heads=5, initializer_range=0.02),
    # https://huggingface.co/HuggingFaceTB/SmolLM2-1.7B/blob/main/config.json
    "smollm2-1.7b": SmolLM2Config(hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                                  num_attention_heads=32, num_key_value_heads=32, rope_theta=130000.0,
                                  initializer_range=0.02),
    # Same tokenizer and layout, 1/100th of the compute: for tests and CPU demos.
    "tiny": SmolLM2Config(hidden_size=96, intermediate_size=256, num_hidden_layers=2,
                          num_attention_heads=3, num_key_value_heads=1, max_position_embeddings=1024,
                          initializer_range=1 / math.sqrt(96)),
}


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in fp32, cast back, then scale: HF's order, which matters in bf16
        return self.weight * F.rms_norm(x.float(), (x.size(-1),), eps=self.eps).to(x.dtype)


def rope_tables(config, device=None):
    """cos/sin of shape (max_positions, head_dim) in fp32, HF's half-split layout."""
    d = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, device=device).float() / d))
    freqs = torch.outer(torch.arange(config.max_position_embeddings, device=device).float(), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)  # (P, hd): the two halves share frequencies
    return emb.cos(), emb.sin()


def apply_rope(x, cos, sin):
    # x: (B, nh, T, hs); cos/sin: (T, hs). rotate_half pairs dim i with dim i + hs/2.
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class KVCache:
    """Keys and values for every layer, allocated once per generation and filled in place."""

    def __init__(self, config, batch_size, max_len, device, dtype):
        shape = (batch_size, config.num_key_value_heads, max_len, config.head_dim)
        # one tensor per layer: a compiled step then updates each in place, not a copy of all of them
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.pos = 0  # number of positions already cached
        self.max_len = max_len

    def update(self, layer_idx, k, v, positions, kv_len):
        """Store k, v (B, nkv, T, hs) at `positions` (T,), a tensor so that one compiled decode step
        serves every position; return the layer's first kv_len slots, (B, nkv, kv_len, hs)."""
        self.k[layer_idx].index_copy_(2, positions, k)
        self.v[layer_idx].index_copy_(2, positions, v)
        return self.k[layer_idx][:, :, :kv_len], self.v[layer_idx][:, :, :kv_len]


class Linear(nn.Linear):
    """nn.Linear without bias, plus a streaming form for decoding on CPU under torch.compile.

    Decoding multiplies one vector by every weight matrix: the time is that of reading the weights.
    MKL runs that one-row GEMM well below the memory bandwidth; written as a broadcast product and a
    sum, Inductor emits one streaming reduction over the weight rows that runs at the bandwidth
    (docs/performance.md). Eager mode keeps F.linear: there the product would be materialised, as
    large as the weight. In bf16 the product and the sum are written in fp32 (as F.linear
    accumulates), rounded to bf16 once."""

    def __init__(self, in_features, out_features):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x):
        if x.device.type == "cpu" and torch.compiler.is_compiling() and x.shape[:-1].numel() == 1:
            product = x.unsqueeze(-2).float() * self.weight.float()  # (..., 1, C) * (N, C)
            return product.sum(-1).to(x.dtype)  # (..., N)
        return F.linear(x, self.weight)


class Attention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv, self.hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.q_proj = Linear(config.hidden_size, self.n_head * self.hd)
        self.k_proj = Linear(config.hidden_size, self.n_kv * self.hd)
        self.v_proj = Linear(config.hidden_size, self.n_kv * self.hd)
        self.o_proj = Linear(self.n_head * self.hd, config.hidden_size)

    def forward(self, x, cos, sin, cache=None, positions=None, mask=None):
        B, T, C = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.hd).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)  # (B, nkv, T, hs)
        v = self.v_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)  # (B, nkv, T, hs)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:  # keys/values of all cached positions; a mask spans the slots to read
            k, v = cache.update(self.layer_idx, k, v, positions, T if mask is None else mask.size(-1))
        if T == 1 and mask is not None and torch.compiler.is_compiling() and x.device.type == "cpu":
            y = decode_attention(q, k, v, mask)
        else:
            y = self.attend(q, k, v, mask)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, nh*hs)
        return self.o_proj(y)

    def attend(self, q, k, v, mask):
        """SDPA of q (B, nh, T, hs) over k, v (B, nkv, S, hs): causal without a mask (the queries are
        the first T positions), else where mask (T, S) is True. GQA: each group of n_head/n_kv query
        heads reads one K/V head, in the kernel where it can (gqa_in_kernel), else through a repeat
        copy of K/V. (CPU training may replace it: smollm2/speedups.py.)"""
        capability = cuda_capability(q.device) if q.device.type == "cuda" else None
        gqa = gqa_in_kernel(q.device.type, q.dtype, mask is not None, q.size(-1), capability)
        if not gqa:
            k, v = (t.repeat_interleave(self.n_head // self.n_kv, dim=1) for t in (k, v))  # (B, nh, S, hs)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and q.size(2) > 1,
                                              enable_gqa=gqa)


def gqa_in_kernel(device_type, dtype, masked, head_dim, capability=None):
    """Whether SDPA should read grouped K/V heads itself (enable_gqa) rather than from a repeat copy.
    On CPU its flash kernel does. On CUDA only the flash kernel does (16-bit, no mask, head_dim a
    multiple of 8 up to 256, compute capability 8.0+): the memory-efficient kernel refuses unequal
    head counts, so enable_gqa elsewhere (a T4, fp32, a mask) falls back to the math kernel and its
    fp32 (B, nh, T, T) matrices kept for backward: 18 GB over 30 layers at B=4, T=2048 in fp16,
    where the repeat copies of K and V take 19 MB a layer.
    MPS: enable_gqa crashed there in torch <= 2.6."""
    if device_type == "cpu":
        return True
    if device_type != "cuda":
        return False
    return (dtype in (torch.float16, torch.bfloat16) and not masked and head_dim % 8 == 0 and head_dim <= 256
            and capability is not None and tuple(capability) >= (8, 0))


def cuda_capability(device):
    """(major, minor) of a CUDA device; constant-folded under torch.compile."""
    props = torch.cuda.get_device_properties(device)
    return props.major, props.minor


def decode_attention(q, k, v, mask):
    """SDPA for one query per sequence, as products and sums that Inductor fuses into a few loops
    (the CPU flash-attention kernel costs more in set-up than the work itself at T=1).
    q: (B, nh, 1, hs); k, v: (B, nkv, S, hs); mask: (1, S), True where a key may be read."""
    B, nh, _, hs = q.shape
    q = q.view(B, k.size(1), nh // k.size(1), 1, hs)  # (B, nkv, group, 1, hs): query heads of one K/V head
    scores = (q * k.unsqueeze(2)).sum(-1, dtype=torch.float32) / math.sqrt(hs)  # (B, nkv, group, S)
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    y = (probs.unsqueeze(-1) * v.unsqueeze(2)).sum(-2)  # (B, nkv, group, hs), fp32
    return y.view(B, nh, 1, hs).to(v.dtype)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate_proj = Linear(config.hidden_size, config.intermediate_size)
        self.up_proj = Linear(config.hidden_size, config.intermediate_size)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class DecoderLayer(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, cache=None, positions=None, mask=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, positions, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    """The trunk, named `model` inside SmolLM2 so that parameter names match HF's."""

    def __init__(self, config):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class SmolLM2(nn.Module):
    gradient_checkpointing = False  # True: recompute each decoder layer in backward (less memory, ~1/3 more compute)

    def __init__(self, config=None):
        super().__init__()
        self.config = config = config or SmolLM2Config()
        self.model = LlamaModel(config)
        self.lm_head = Linear(config.hidden_size, config.vocab_size)
        self.lm_head.weight = self.model.embed_tokens.weight  # tied: one matrix, read and written twice
        cos, sin = rope_tables(config)
        self.register_buffer("rope_cos", cos, persistent=False)  # not saved: derived from config
        self.register_buffer("rope_sin", sin, persistent=False)
        self.init_weights()

    def init_weights(self):
        """Normal(0, initializer_range) everywhere, as HF does; the two projections that write into
        the residual stream get std / sqrt(2L), as in GPT-2, so its variance does not grow with depth."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
        for layer in self.model.layers:
            for proj in (layer.self_attn.o_proj, layer.mlp.down_proj):
                nn.init.normal_(proj.weight, mean=0.0, std=std / math.sqrt(2 * self.config.num_hidden_layers))

    def forward(self, idx, targets=None, cache=None):
        """idx: (B, T) token ids -> (logits (B, T, V), loss or None). Targets -1 are ignored.
        With a cache, idx continues the cached positions and is added to the cache. (Training
        computes the loss without the (B, T, V) logits: smollm2/chunked_loss.py.)"""
        logits = self.lm_head(self.hidden_states(idx, cache))  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def hidden_states(self, idx, cache=None, doc=None):
        """(B, T) token ids -> (B, T, C), the final norm's output; with a cache, continue from it.
        doc (B, T): rows that pack several sequences (conversations) number them, and a token attends
        only to earlier tokens of its own; RoPE scores depend on relative positions only, so each
        sequence needs no position reset to be computed as if it were alone."""
        B, T = idx.shape
        start = cache.pos if cache is not None else 0
        if start + T > self.config.max_position_embeddings:
            raise ValueError(f"sequence of {start + T} tokens exceeds the context window "
                             f"of {self.config.max_position_embeddings}")
        positions = torch.arange(start, start + T, device=idx.device)
        mask = None  # the first T positions: causal attention over them (SDPA's is_causal)
        if start > 0:  # query at position p reads the cached keys at positions <= p
            mask = torch.arange(start + T, device=idx.device) <= positions[:, None]  # (T, start+T)
        if doc is not None:  # block-diagonal causal: (B, 1, T, T)
            causal = torch.ones(T, T, dtype=torch.bool, device=idx.device).tril()
            mask = (doc[:, None, :, None] == doc[:, None, None, :]) & causal
        x = self.trunk(idx, positions, cache, mask)
        if cache is not None:
            cache.pos += T
        return x

    def trunk(self, idx, positions, cache=None, mask=None):
        """Embedding, layers and final norm for tokens idx (B, T) at positions (T,), a tensor."""
        x = self.model.embed_tokens(idx)  # (B, T, C)
        cos = self.rope_cos[positions].to(x.dtype)  # (T, hs), rounded as HF rounds it
        sin = self.rope_sin[positions].to(x.dtype)
        recompute = self.gradient_checkpointing and self.training and cache is None and torch.is_grad_enabled()
        for layer in self.model.layers:
            if recompute:  # keep only each layer's input; recompute the rest in backward
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, None, positions, mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, cache, positions, mask)
        return self.model.norm(x)

    # ----------------------------------------------------------------------------- generation
    def decode_step(self, idx, positions, cache):
        """Logits (B, V) of one new token per sequence, idx (B, 1) at positions (1,), attending to every
        cache slot up to it. Shapes never change, so one compiled graph serves a whole generation."""
        mask = torch.arange(cache.max_len, device=idx.device) <= positions[:, None]  # (1, S)
        return self.lm_head(self.trunk(idx, positions, cache, mask)[:, -1])

    def compiled_decode_step(self):
        """decode_step through torch.compile, built once per model; None once compiling has failed.
        On CPU, two Inductor options: each RMSNorm is computed once, not again in every weight row's
        loop (realize_opcount_threshold), and the wrapper skips input shape checks that Dynamo's guards
        already make (size_asserts). Dynamo's recursive dict tags skip re-checking the modules'
        unchanged attribute dicts before each token; weights changed later (new values, a dtype, a new
        Parameter) still count. Each is a measured gain (docs/performance.md)."""
        if not hasattr(self, "_compiled_step"):
            cpu = self.lm_head.weight.device.type == "cpu"
            options = {"realize_opcount_threshold": 4, "size_asserts": False} if cpu else None
            step = torch.compile(self.decode_step, dynamic=False, fullgraph=True, options=options)
            if hasattr(torch._dynamo.config, "use_recursive_dict_tags_for_guards"):  # not in older torch
                step = torch._dynamo.config.patch(use_recursive_dict_tags_for_guards=True)(step)
            self._compiled_step = step
        return self._compiled_step

    def decode_eagerly(self):
        """Give up the compiled decode step (building it failed): generation decodes eagerly."""
        self._compiled_step = None

    @torch.inference_mode()
    def generate_stream(self, prompt, max_new_tokens=128, temperature=0.0, top_k=None, top_p=None,
                        repetition_penalty=1.0, eos_token_id=None, generator=None, compile=False,
                        cache_len=None):
        """Yield new token ids one at a time. prompt: a list or 1-D tensor of ids (batch 1).

        Sampling follows HF's generate: repetition penalty, then temperature, top-k, top-p;
        temperature 0 is greedy. A prompt longer than the cache (the window at most) keeps its last
        tokens; when the cache fills up, it restarts from the last half of the text. compile=True runs each
        new token through torch.compile'd decode_step: several times faster on CPU, after a one-off
        compilation on the first call (kept for later calls, and Inductor caches it on disk); if
        compiling fails, it warns and carries on in eager mode. cache_len: the
        KV cache's slots (default: prompt + new tokens, rounded up to 256 with compile), each size
        a compiled graph of its own.
        """
        device = self.lm_head.weight.device
        ids = torch.as_tensor(prompt, dtype=torch.long, device=device).view(-1)
        if ids.numel() == 0:
            raise ValueError("prompt is empty: give at least one token")
        size = cache_len or ids.numel() + max_new_tokens
        if compile and not cache_len:  # round up, so that other prompt lengths reuse the compiled graph
            size = -(-size // 256) * 256
        size = min(self.config.max_position_embeddings, size)  # the context window at most
        ids = ids[-(size - 1):]  # leave room for at least one new token
        seen = torch.zeros(self.config.vocab_size, dtype=torch.bool, device=device)
        seen[ids] = True
        cache = KVCache(self.config, 1, size, device, self.lm_head.weight.dtype)
        step = self.compiled_decode_step() if compile else None

        def last_logits(new_ids):  # add new_ids to the cache; (1, V) logits of the last one
            return self.lm_head(self.hidden_states(new_ids[None], cache)[:, -1])

        logits = last_logits(ids)
        for _ in range(max_new_tokens):
            scores = logits[0].float()
            if repetition_penalty != 1.0:
                penalised = torch.where(scores < 0, scores * repetition_penalty, scores / repetition_penalty)
                scores = torch.where(seen, penalised, scores)
            token = sample(scores, temperature, top_k, top_p, generator)
            yield token
            if eos_token_id is not None and token == eos_token_id:
                return
            seen[token] = True
            ids = torch.cat((ids, ids.new_tensor([token])))
            if cache.pos == cache.max_len:  # cache full: restart from the last half of the text
                ids = ids[-(size // 2):]
                cache.pos = 0
                logits = last_logits(ids)
            elif step is not None:
                logits, step = self._compiled_next(step, ids[-1:][None], cache)
            else:
                logits = last_logits(ids[-1:])

    def _compiled_next(self, step, idx, cache):
        """(logits, step) for one token through the compiled step; (eager logits, None) if it fails."""
        positions = torch.tensor([cache.pos], device=idx.device)
        try:
            logits = step(idx, positions, cache)
        except Exception as e:  # no C++ compiler, unsupported platform...: stay correct, just slower
            import warnings
            warnings.warn(f"torch.compile of the decode step failed ({type(e).__name__}: {e}); "
                          "generating in eager mode")
            self.decode_eagerly()
            step = None
            logits = self.decode_step(idx, positions, cache)
        cache.pos += 1
        return logits, step

    def generate(self, prompt, max_new_tokens=128, **kwargs):
        """All new token ids at once, as a list (see generate_stream for the arguments)."""
        return list(self.generate_stream(prompt, max_new_tokens, **kwargs))

    # ----------------------------------------------------------------------------- HF format
    @classmethod
    def from_pretrained(cls, source, dtype=torch.float32, device="cpu"):
        """Load from an HF model directory, a .safetensors or .gguf file, a training checkpoint
        (.pt, weights only), or a hub id such as HuggingFaceTB/SmolLM2-135M (needs network).
        Sets model.source_info: where the weights came from (and the step, for a checkpoint)."""
        from smollm2 import weights  # every format's reader: a config dict and a state dict
        config, state, info = weights.load_weights(str(source))
        try:
            config = SmolLM2Config(**{f.name: config[f.name] for f in fields(SmolLM2Config) if f.name in config})
        except (TypeError, ValueError) as e:
            raise weights.ModelLoadError(f"{source}: bad config: {e}") from None
        model = cls(config)
        weights.check_state_dict(model, state, source)
        model.load_state_dict(state, strict=False)  # checked strictly above, with clear messages
        model.source_info = info
        return model.to(device=device, dtype=dtype)

    def save_pretrained(self, out_dir, dtype=None, tokenizer_dir="default"):
        """Write config.json, model.safetensors, generation_config.json and the tokenizer files: a
        directory that transformers' AutoModelForCausalLM loads. tokenizer_dir: "default" copies the
        repo's tokenizer/, None none."""
        from smollm2 import weights
        tokenizer_dir = weights.TOKENIZER_DIR if tokenizer_dir == "default" else tokenizer_dir
        weights.save_pretrained(self, out_dir, dtype, tokenizer_dir)


# --------------------------------------------------------------------------------- sampling
def sample(scores, temperature=0.0, top_k=None, top_p=None, generator=None):
    """One token id from 1-D logits, with HF's top-k (ties kept) and top-p (>= 1 token kept)."""
    if not temperature or temperature <= 0:
        return int(scores.argmax())
    scores = scores / temperature
    if top_k is not None and 0 < top_k < scores.numel():
        kth = torch.topk(scores, top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_scores, order = torch.sort(scores)  # ascending
        cum = sorted_scores.softmax(-1).cumsum(-1)
        drop = cum <= 1 - top_p
        drop[-1] = False  # always keep the most likely token
        scores = scores.masked_fill(drop.scatter(0, order, drop), float("-inf"))
    probs = scores.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))


# --------------------------------------------------------------------------------- summary
def param_breakdown(model):
    """Parameter counts by kind; the tied embedding is counted once."""
    groups = {"embeddings (tied with lm_head)": "embed_tokens", "attention q_proj": "q_proj",
              "attention k_proj": "k_proj", "attention v_proj": "v_proj", "attention o_proj": "o_proj",
              "mlp gate_proj": "gate_proj", "mlp up_proj": "up_proj", "mlp down_proj": "down_proj",
              "norms": "norm"}
    counts = dict.fromkeys(groups, 0)
    for name, p in model.named_parameters():  # named_parameters yields a shared tensor once
        label = next(g for g, key in groups.items() if key in name)
        counts[label] += p.numel()
    counts["total"] = sum(p.numel() for p in model.parameters())
    return counts


def flops_per_token(config, seq_len, n_params):
    """Training FLOPs per token: 6N for the matmuls plus 12*L*d*T for attention (as in PaLM)."""
    return 6 * n_params + 12 * config.num_hidden_layers * config.hidden_size * seq_len


if __name__ == "__main__":
    import argparse
    parser = argparse.ArgumentParser(description="Print the model summary and parameter breakdown.")
    parser.add_argument("--model", default="smollm2-135m", choices=sorted(PRESETS))
    parser.add_argument("--seq-len", type=int, default=256, help="context length for FLOPs per token")
    args = parser.parse_args()
    cfg = PRESETS[args.model]
    with torch.device("meta"):
        net = SmolLM2(cfg)
    print(net)
    print(f"\nconfig: {asdict(cfg)}\n")
    counts = param_breakdown(net)
    for label, n in counts.items():
        print(f"{label:32s} {n:>14,d}  {100 * n / counts['total']:5.1f}%")
    fpt = flops_per_token(cfg, args.seq_len, counts["total"])
    print(f"\ntraining FLOPs per token at T={args.seq_len}: {fpt / 1e9:.3f} GFLOP "
          f"(forward only: {fpt / 3e9:.3f} GFLOP)")
