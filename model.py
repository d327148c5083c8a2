"""SmolLM2 in one readable file: the config, the presets and the model (smollm2/weights.py reads and
writes its files; smollm2/engine.py generates with a KV cache; smollm2/speedups.py holds what only
makes it faster).

The architecture is Llama (as in Hugging Face's models/llama/modeling_llama.py, our numerical
oracle): pre-norm RMSNorm, grouped-query attention with half-split RoPE, a SwiGLU MLP, no biases
and the input embedding tied to the LM head. Parameter names are HF's verbatim, so an HF state dict
loads with strict=True and no key map. References: SmolLM2 (arXiv:2502.02737), Llama
(arXiv:2302.13971), RoPE (arXiv:2104.09864), GQA (arXiv:2305.13245), nanoGPT for the layout.
"""
import math
from dataclasses import dataclass, fields

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
    # x: (B, nh, T, hs); cos/sin: (1 or B, 1, T, hs). rotate_half pairs dim i with dim i + hs/2.
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class ScaledDotProductAttention(nn.Module):
    """softmax(q k^T / sqrt(hs)) v over q (B, nh, T, hs) and k, v (B, nkv, S, hs): causal without a
    mask (the queries are the first T positions), else where mask (B or 1, 1, T, S) is True. Each group
    of nh/nkv query heads reads one K/V head inside the kernel (enable_gqa), no repeat copy of K/V.
    A module of its own so that smollm2/speedups.py can swap in a kernel for a device."""

    def forward(self, q, k, v, mask=None):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and q.size(2) > 1,
                                              enable_gqa=k.size(1) != q.size(1))


class Attention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head, self.n_kv, self.hd = config.num_attention_heads, config.num_key_value_heads, config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, self.n_head * self.hd, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.n_kv * self.hd, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.n_kv * self.hd, bias=False)
        self.o_proj = nn.Linear(self.n_head * self.hd, config.hidden_size, bias=False)
        self.sdpa = ScaledDotProductAttention()

    def forward(self, x, cos, sin, mask=None, cache=None, positions=None):
        B, T, C = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.hd).transpose(1, 2)  # (B, nh, T, hs)
        k = self.k_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)  # (B, nkv, T, hs)
        v = self.v_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)  # (B, nkv, T, hs)
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)  # under autocast q is already 16-bit: keep it so
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:  # store k, v at their positions; read every slot of the cache (the mask says which)
            k, v = cache.update(self.layer_idx, k, v, positions)  # (B, nkv, S, hs)
        y = self.sdpa(q, k, v, mask)  # (B, nh, T, hs)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, C))  # heads side by side: (B, T, nh*hs)


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class DecoderLayer(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, mask=None, cache=None, positions=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, positions)
        return x + self.mlp(self.post_attention_layernorm(x))


class SmolLM2(nn.Module):
    gradient_checkpointing = False  # True: recompute each decoder layer in backward (less memory, ~1/3 more compute)

    def __init__(self, config=None):
        super().__init__()
        self.config = config = config or SmolLM2Config()
        self.model = nn.ModuleDict(dict(  # the trunk, named as in HF: model.embed_tokens, model.layers.N...
            embed_tokens=nn.Embedding(config.vocab_size, config.hidden_size),
            layers=nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers)),
            norm=RMSNorm(config.hidden_size, config.rms_norm_eps)))
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
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

    def forward(self, idx, targets=None, cache=None, doc=None):
        """idx: (B, T) token ids -> (logits (B, T, V), the mean cross-entropy against targets or None;
        targets -1 are ignored). cache and doc: see hidden_states. (Training computes the loss without
        the (B, T, V) logits: smollm2/chunked_loss.py.)"""
        logits = self.lm_head(self.hidden_states(idx, cache, doc))  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def hidden_states(self, idx, cache=None, doc=None):
        """(B, T) token ids -> (B, T, C), the final norm's output.
        cache (smollm2/engine.py's KVCache): each row of idx continues that row of the cache (rows
        may stand at different lengths) and is added to it.
        doc (B, T): rows that pack several sequences (conversations) number them, and a token attends
        only to earlier tokens of its own; RoPE scores depend on relative positions only, so each
        sequence needs no position reset to be computed as if it were alone."""
        B, T = idx.shape
        if (cache.size if cache is not None else T) > self.config.max_position_embeddings:
            raise ValueError(f"sequence of {cache.size if cache is not None else T} tokens exceeds the context "
                             f"window of {self.config.max_position_embeddings}")
        positions = torch.arange(T, device=idx.device)  # (T,)
        mask = None  # the first T positions: causal attention over them (SDPA's is_causal)
        if cache is not None:  # a query at position p reads the cache's slots <= p
            positions = cache.lengths[:, None] + positions  # (B, T)
            mask = (torch.arange(cache.size, device=idx.device) <= positions[..., None])[:, None]  # (B, 1, T, S)
        if doc is not None:  # block-diagonal causal, as a bias that every layer reads: see document_bias
            mask = document_bias(doc, self.compute_dtype(idx.device))
        x = self.trunk(idx, positions, mask, cache)
        if cache is not None:
            cache.lengths += T
        return x

    def compute_dtype(self, device):
        """The dtype the layers compute in: autocast's where it is on, else the weights'."""
        if torch.is_autocast_enabled(device.type):
            return torch.get_autocast_dtype(device.type)
        return self.model.embed_tokens.weight.dtype

    def trunk(self, idx, positions, mask=None, cache=None):
        """Embedding, layers and final norm for tokens idx (B, T) at positions (T,) or (B, T)."""
        x = self.model.embed_tokens(idx)  # (B, T, C)
        cos = self.rope_cos[positions].to(x.dtype).unsqueeze(-3)  # (1 or B, 1, T, hs), rounded as HF rounds it
        sin = self.rope_sin[positions].to(x.dtype).unsqueeze(-3)
        recompute = self.gradient_checkpointing and self.training and cache is None and torch.is_grad_enabled()
        for layer in self.model.layers:
            if recompute:  # keep only each layer's input; recompute the rest in backward
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, mask, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache, positions)
        return self.model.norm(x)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, generator=None):
        """The reference sampler, as nanoGPT's: idx (B, T) -> (B, T + max_new_tokens), each new token
        from a full forward pass of the last window of tokens (no KV cache; smollm2/engine.py has
        the fast one). temperature 0 picks the most likely token."""
        for _ in range(max_new_tokens):
            logits = self(idx[:, -self.config.max_position_embeddings:])[0][:, -1].float()  # (B, V)
            if temperature == 0:
                next_id = logits.argmax(-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                next_id = torch.multinomial(logits.softmax(-1), 1, generator=generator)
            idx = torch.cat((idx, next_id), dim=1)
        return idx

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


def document_bias(doc, dtype):
    """doc (B, T) numbers the sequences packed in each row -> the additive attention bias (B, 1, T, T):
    0 where a token may attend (itself and the earlier tokens of its own sequence), -inf elsewhere.
    Built once per forward in the dtype attention computes in, so that every layer reads this one
    tensor: given a boolean mask, SDPA would build such a bias in every layer and keep each for
    backward (30 of them: about 4 GB at B=16, T=2048 in bf16)."""
    T = doc.size(1)
    causal = torch.ones(T, T, dtype=torch.bool, device=doc.device).tril()
    allowed = (doc[:, None, :, None] == doc[:, None, None, :]) & causal
    return torch.zeros(allowed.shape, dtype=dtype, device=doc.device).masked_fill_(~allowed, float("-inf"))


def flops_per_token(config, seq_len, n_params):
    """Training FLOPs per token: 6N for the matmuls plus 12*L*d*T for attention (as in PaLM)."""
    return 6 * n_params + 12 * config.num_hidden_layers * config.hidden_size * seq_len
