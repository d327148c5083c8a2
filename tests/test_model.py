"""model.py against its oracle, transformers' LlamaForCausalLM: shapes, logits, the reference generate, I/O; the
SmolLM2 presets' published sizes; gradient checkpointing (the model, and train.py's flag)."""
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from conftest import ROOT, TRAIN_PY, losses, run_cmd, run_train
from conftest import TINY as TINY_RUN
from conftest import TINY_CONFIG as TINY, tiny_model
from model import PRESETS, SmolLM2, SmolLM2Config
from smollm2.chunked_loss import ChunkedLoss
from smollm2.report import param_breakdown
from smollm2.weights import hf_config_dict

# A random tiny config that keeps the real model's 3:1 GQA layout (and everything else but size).


PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ",
           "Once upon a time, in a land far away, there lived a", "Le chat est sur la table, et"]


def tiny_pair(seed=0):
    """Our tiny model and an HF LlamaForCausalLM holding the very same weights."""
    torch.manual_seed(seed)
    ours = SmolLM2(TINY).eval()
    with torch.no_grad():  # random norms too, so a mixed-up norm cannot pass unnoticed
        for name, p in ours.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    hf = LlamaForCausalLM(LlamaConfig(**hf_config_dict(TINY))).eval()
    result = hf.load_state_dict(ours.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return ours, hf


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(os.path.join(ROOT, "tokenizer"))


# ----------------------------------------------------------------------------- architecture
def test_default_config_has_134_515_008_parameters():
    with torch.device("meta"):
        model = SmolLM2()
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    cfg = model.config
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers, cfg.head_dim) == (49152, 576, 30, 64)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size) == (9, 3, 1536)
    assert cfg.rope_theta == 100_000 and cfg.rms_norm_eps == 1e-5
    assert math.isclose(cfg.initializer_range, 1 / math.sqrt(576))


def test_parameter_names_are_hf_llama_names():
    ours, hf = tiny_pair()
    assert set(ours.state_dict()) == set(hf.state_dict())


def test_init_std_is_one_over_sqrt_d_with_scaled_residual_projections():
    torch.manual_seed(0)
    model = SmolLM2(PRESETS["tiny"])
    std = PRESETS["tiny"].initializer_range
    assert model.model.embed_tokens.weight.std().item() == pytest.approx(std, rel=0.02)
    q = model.model.layers[0].self_attn.q_proj.weight
    o = model.model.layers[0].self_attn.o_proj.weight
    assert q.std().item() == pytest.approx(std, rel=0.05)
    assert o.std().item() == pytest.approx(std / math.sqrt(2 * 2), rel=0.05)


def test_embedding_tie_holds_after_to_and_after_loading(tmp_path):
    ours, _ = tiny_pair()
    ours = ours.to(torch.bfloat16).to(torch.float32)
    assert ours.lm_head.weight is ours.model.embed_tokens.weight
    ours.save_pretrained(tmp_path, tokenizer_dir=None)
    loaded = SmolLM2.from_pretrained(tmp_path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    with torch.no_grad():
        loaded.model.embed_tokens.weight[0, 0] += 1.0  # one matrix: writing one writes the other
    assert loaded.lm_head.weight[0, 0] == loaded.model.embed_tokens.weight[0, 0]


def test_bad_config_is_refused_with_a_clear_message():
    with pytest.raises(ValueError, match="heads"):
        SmolLM2Config(hidden_size=100, num_attention_heads=9)
    with pytest.raises(ValueError, match="key/value"):
        SmolLM2Config(num_attention_heads=9, num_key_value_heads=2)
    with pytest.raises(ValueError, match="positive"):
        SmolLM2Config(num_hidden_layers=0)


# ----------------------------------------------------------------------------- parity
def test_tiny_random_model_logits_match_transformers():
    ours, hf = tiny_pair()
    idx = torch.randint(0, TINY.vocab_size, (2, 37))
    with torch.no_grad():
        logits, loss = ours(idx[:, :-1], idx[:, 1:])
        ref = hf(idx[:, :-1], labels=idx[:, :-1])  # HF shifts labels itself, so score T-2 positions
        torch.testing.assert_close(logits, ref.logits)
        ours_loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, TINY.vocab_size),
                                                      idx[:, 1:-1].reshape(-1))
    torch.testing.assert_close(ours_loss, ref.loss)
    assert loss.item() == pytest.approx(math.log(TINY.vocab_size), rel=0.1)  # random init: ~ln V


def test_tiny_random_model_training_gradients_match_transformers():
    ours, hf = tiny_pair()
    ours.train(), hf.train()
    idx = torch.randint(0, TINY.vocab_size, (2, 37))
    loss = ChunkedLoss(ours)(idx[:, :-1], idx[:, 1:])  # the training path: chunked loss
    ref = hf(idx, labels=idx).loss  # HF shifts the labels itself: the same 2 x 36 predictions
    torch.testing.assert_close(loss, ref)
    loss.backward(), ref.backward()
    hf_params = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, hf_params[name].grad, atol=1e-6, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def test_rope_matches_transformers_rotary_embedding():
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb
    from model import apply_rope, rope_tables
    cfg = PRESETS["smollm2-135m"]
    hf_rope = LlamaRotaryEmbedding(LlamaConfig(**hf_config_dict(cfg)))
    positions = torch.tensor([[0, 1, 2, 100, 4095, 8191]])
    q, k = torch.randn(1, 9, 6, 64), torch.randn(1, 3, 6, 64)
    cos_hf, sin_hf = hf_rope(q, positions)
    cos, sin = rope_tables(cfg)
    ref_q, ref_k = apply_rotary_pos_emb(q, k, cos_hf, sin_hf)
    torch.testing.assert_close(apply_rope(q, cos[positions[0]], sin[positions[0]]), ref_q)
    torch.testing.assert_close(apply_rope(k, cos[positions[0]], sin[positions[0]]), ref_k)


@pytest.mark.slow
def test_real_weights_logits_match_transformers(real_model, hf_real_model, tokenizer):
    for prompt in PROMPTS:
        idx = torch.tensor([tokenizer(prompt)["input_ids"]])
        with torch.no_grad():
            diff = (real_model(idx)[0] - hf_real_model(idx).logits).abs().max().item()
        assert diff <= 1e-4, f"{prompt!r}: max abs logit difference {diff}"


# ----------------------------------------------------------------------------- reference generate
def test_reference_generate_is_greedy_argmax_and_samples_within_top_k():
    ours, hf = tiny_pair()
    idx = torch.randint(0, TINY.vocab_size, (2, 9))
    out = ours.generate(idx, 12, temperature=0)
    ref = hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=12, do_sample=False,
                      eos_token_id=None, pad_token_id=0)
    assert torch.equal(out, ref)  # both rows, no KV cache here, HF's cache there
    g = torch.Generator().manual_seed(0)
    sampled = ours.generate(idx[:1], 5, temperature=1.0, top_k=1, generator=g)
    assert torch.equal(sampled, out[:1, :14])  # top-k 1 is greedy at any temperature
    window = ours.config.max_position_embeddings
    long = ours.generate(torch.randint(0, TINY.vocab_size, (1, window + 3)), 2, temperature=0)
    assert long.shape == (1, window + 5)  # past the window it reads the last window of tokens


# ----------------------------------------------------------------------------- HF format I/O
def test_save_pretrained_loads_in_transformers_and_back(tmp_path):
    ours, _ = tiny_pair()
    ours.save_pretrained(tmp_path / "ours")
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= set(os.listdir(tmp_path / "ours"))
    hf, info = AutoModelForCausalLM.from_pretrained(tmp_path / "ours", output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    idx = torch.randint(0, TINY.vocab_size, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(hf.eval()(idx).logits, ours(idx)[0])
        hf.save_pretrained(tmp_path / "hf")  # and back: transformers' own files load into ours
        again = SmolLM2.from_pretrained(tmp_path / "hf").eval()
        torch.testing.assert_close(again(idx)[0], ours(idx)[0])
    assert again.config == ours.config
    AutoTokenizer.from_pretrained(tmp_path / "ours")  # the tokenizer files work there too


# ----------------------------------------------------------------------------- presets
HF_CONFIGS = {  # from the config.json files linked beside the presets in model.py
    "smollm2-360m": dict(vocab_size=49152, hidden_size=960, intermediate_size=2560, num_hidden_layers=32,
                         num_attention_heads=15, num_key_value_heads=5, max_position_embeddings=8192,
                         rope_theta=100000.0, rms_norm_eps=1e-5),
    "smollm2-1.7b": dict(vocab_size=49152, hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                         num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=8192,
                         rope_theta=130000.0, rms_norm_eps=1e-5),
}


@pytest.mark.parametrize("name, total", [("smollm2-135m", 134_515_008), ("smollm2-360m", 361_821_120),
                                         ("smollm2-1.7b", 1_711_376_384)])
def test_presets_have_the_published_parameter_counts(name, total):
    with torch.device("meta"):
        model = SmolLM2(PRESETS[name])
    assert param_breakdown(model)["total"] == total
    for key, value in HF_CONFIGS.get(name, {}).items():
        assert getattr(PRESETS[name], key) == value, key


# ----------------------------------------------------------------------------- gradient checkpointing
def loss_and_grads(model, idx):
    loss = ChunkedLoss(model)(idx[:, :-1], idx[:, 1:])
    return loss, torch.autograd.grad(loss, list(model.parameters()))


def test_gradient_checkpointing_recomputes_each_layer_with_the_same_loss_and_gradients():
    torch.manual_seed(0)
    model = SmolLM2(TINY).train()
    idx = torch.randint(0, TINY.vocab_size, (2, 33))
    calls = []
    for layer in model.model.layers:
        layer.register_forward_pre_hook(lambda *_: calls.append(1))  # recomputation may stop early
    plain_loss, plain = loss_and_grads(model, idx)
    assert len(calls) == 3
    model.gradient_checkpointing = True
    ckpt_loss, ckpt = loss_and_grads(model, idx)
    assert len(calls) == 3 + 6  # each layer ran again in backward
    assert torch.equal(ckpt_loss, plain_loss)
    for a, b in zip(ckpt, plain):
        assert torch.equal(a, b)
    with torch.no_grad():  # nothing to recompute without gradients
        model(idx)
    assert len(calls) == 12


def test_gradient_checkpointing_cli_with_grad_accum_gives_the_same_losses_and_says_so(tmp_path, corpus):
    args = [*TINY_RUN, "--data", corpus, "--steps", 3, "--grad-accum", 2, "--val-frac", 0]
    run_train(tmp_path, *args, "--save", "plain/ckpt.pt", "--metrics", "plain/metrics.jsonl")
    proc = run_train(tmp_path, *args, "--gradient-checkpointing", "--save", "gc/ckpt.pt", "--metrics", "gc/metrics.jsonl")
    assert "device cpu, fp32, gradient checkpointing" in proc.stdout
    assert losses(tmp_path / "gc/metrics.jsonl") == losses(tmp_path / "plain/metrics.jsonl")


def test_gradient_checkpointing_under_ddp_matches_one_process_with_grad_accum(tmp_path, corpus):
    args = [*TINY_RUN, "--data", corpus, "--steps", 2, "--val-frac", 0]
    ddp = run_cmd(tmp_path, sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                  TRAIN_PY, *args, "--gradient-checkpointing", "--save", "ddp/ckpt.pt", "--metrics", "ddp/metrics.jsonl")
    assert "2 processes" in ddp.stdout and "gradient checkpointing" in ddp.stdout
    run_train(tmp_path, *args, "--grad-accum", 2, "--save", "one/ckpt.pt", "--metrics", "one/metrics.jsonl")
    assert losses(tmp_path / "ddp/metrics.jsonl") == pytest.approx(losses(tmp_path / "one/metrics.jsonl"),
                                                                   abs=1e-5, rel=0)


@pytest.mark.slow
def test_gradient_checkpointing_under_torch_compile_matches_eager():
    torch.manual_seed(0)
    model = SmolLM2(TINY).train()
    idx = torch.randint(0, TINY.vocab_size, (2, 33))
    eager_loss, eager = loss_and_grads(model, idx)
    model.gradient_checkpointing = True
    compiled_loss, compiled = loss_and_grads(torch.compile(model), idx)
    torch.testing.assert_close(compiled_loss, eager_loss)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------- packed rows
@pytest.mark.parametrize("checkpointing", [False, True])
def test_packed_sequences_give_what_each_gives_alone_and_their_gradients(checkpointing):
    """A row packing three sequences (doc numbers them) gives each one's hidden states and loss as
    if it were alone at position 0: the block-diagonal mask, and RoPE's relative positions."""
    model = tiny_model()
    model.gradient_checkpointing = checkpointing
    g = torch.Generator().manual_seed(0)
    lengths = [5, 9, 7]
    seqs = [torch.randint(0, TINY.vocab_size, (n,), generator=g) for n in lengths]
    idx = torch.cat(seqs)[None]
    doc = torch.cat([torch.full((n,), d) for d, n in enumerate(lengths)])[None]
    packed = model.hidden_states(idx, doc=doc)[0]
    alone = torch.cat([model.hidden_states(s[None])[0] for s in seqs])
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(model.hidden_states(idx)[0, 5:], alone[5:], atol=1e-3)  # without doc: attends across
    # the chunked loss over packed targets (-1 where a sequence ends) equals the loss of the sequences alone
    targets = torch.cat([torch.cat([s[1:], torch.tensor([-1])]) for s in seqs])[None]
    loss = ChunkedLoss(model)(idx, targets, doc)
    loss.backward()
    grad = model.lm_head.weight.grad.clone()
    model.zero_grad()
    x = torch.nn.utils.rnn.pad_sequence([s[:-1] for s in seqs], batch_first=True)
    y = torch.nn.utils.rnn.pad_sequence([s[1:] for s in seqs], batch_first=True, padding_value=-1)
    reference = model(x, y)[1]
    reference.backward()
    torch.testing.assert_close(loss, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad, model.lm_head.weight.grad, atol=1e-5, rtol=1e-4)
    model.zero_grad()
    ChunkedLoss(model)(idx, targets, doc).backward()
    packed_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model(x, y)[1].backward()
    for (name, p), g in zip(model.named_parameters(), packed_grads):  # every weight's gradient
        torch.testing.assert_close(g, p.grad, atol=1e-5, rtol=1e-4, msg=name)


def saved_biases(model, idx, doc, device_type="cpu"):
    """The distinct (B, 1 or H, T, T) tensors a bf16 forward of packed rows keeps for backward."""
    T, seen = idx.size(1), set()

    def pack(t):
        if t.dim() == 4 and t.shape[-2:] == (T, T):
            seen.add(t.untyped_storage().data_ptr())
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast(device_type, torch.bfloat16):
        model.hidden_states(idx, doc=doc).float().square().mean()
    return len(seen)


def test_a_packed_batch_keeps_one_attention_bias_for_backward_not_one_per_layer(monkeypatch):
    """SDPA keeps its mask for backward; given a boolean mask it made a bias in every layer (30 kept: about
    4 GB at B=16, T=2048 in bf16). The bias made once per forward is one tensor, however many layers."""
    import model as model_module
    model, T = tiny_model().train(), 48
    idx, doc = torch.randint(0, TINY.vocab_size, (2, T)), (torch.arange(T) // 20).expand(2, -1)
    assert saved_biases(model, idx, doc) == 1
    bias = model_module.document_bias
    monkeypatch.setattr(model_module, "document_bias", lambda doc, dtype: bias(doc, dtype) == 0)  # the old mask
    assert saved_biases(model, idx, doc) == TINY.num_hidden_layers


def test_under_bf16_autocast_attention_gets_bf16_q_k_v_and_one_bf16_document_bias_for_every_layer(monkeypatch):
    """Grouped K/V reach a GPU's flash kernel only as 16-bit q, k, v (speedups.flash_reads_groups);
    and a packed batch's bias is built once, in the dtype SDPA computes in (a boolean mask would be
    made into a bias by every layer, each kept for backward)."""
    import model as model_module
    seen = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(model_module.F, "scaled_dot_product_attention",
                        lambda q, k, v, attn_mask=None, **kw: seen.append((q, k, v, attn_mask)) or sdpa(q, k, v, attn_mask, **kw))
    model = tiny_model().train()
    idx = torch.randint(0, TINY.vocab_size, (2, 16))
    doc = torch.cat([torch.zeros(2, 6, dtype=torch.long), torch.ones(2, 10, dtype=torch.long)], 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ChunkedLoss(model)(idx, idx, doc).backward()
        model(idx)
    packed, plain = seen[:TINY.num_hidden_layers], seen[TINY.num_hidden_layers:]
    assert len(plain) == TINY.num_hidden_layers
    assert all(t.dtype == torch.bfloat16 for call in seen for t in call[:3])
    assert all(call[3] is packed[0][3] for call in packed) and packed[0][3].dtype == torch.bfloat16
    assert packed[0][3].shape == (2, 1, 16, 16) and all(call[3] is None for call in plain)
