"""model.py against its oracle, transformers' LlamaForCausalLM: shapes, logits, generation, I/O; the
SmolLM2 presets' published sizes; gradient checkpointing (the model, and train.py's flag)."""
import math
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from conftest import ROOT, TRAIN_PY, losses, run_cmd, run_train
from conftest import TINY as TINY_RUN
from conftest import TINY_CONFIG as TINY, tiny_model
from model import KVCache, PRESETS, SmolLM2, SmolLM2Config, param_breakdown, sample
from smollm2.chunked_loss import ChunkedLoss
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


@pytest.mark.slow
def test_real_weights_64_greedy_tokens_match_transformers_generate(real_model, hf_real_model, tokenizer):
    prompts = PROMPTS[:2] + [tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], tokenize=False, add_generation_prompt=True)]
    for prompt in prompts:
        ids = tokenizer(prompt)["input_ids"]
        ours = real_model.generate(ids, 64)  # EOS off in both: all 64 tokens are compared
        ref = hf_real_model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                     max_new_tokens=64, do_sample=False, eos_token_id=None, pad_token_id=0)
        assert len(ours) == 64 and ours == ref[0, len(ids):].tolist(), prompt
    assert tokenizer.decode(ours).startswith("The capital of France is Paris")


# ----------------------------------------------------------------------------- KV cache
@pytest.mark.parametrize("prompt_len", [1, 50])
def test_kv_cache_decoding_equals_full_recomputation(prompt_len):
    ours, _ = tiny_pair()
    idx = torch.randint(0, TINY.vocab_size, (1, prompt_len + 20))
    with torch.no_grad():
        full, _ = ours(idx)
        cache = KVCache(TINY, 1, idx.size(1), "cpu", torch.float32)
        steps = [ours(idx[:, :prompt_len], cache=cache)[0]]
        for t in range(prompt_len, idx.size(1)):
            steps.append(ours(idx[:, t:t + 1], cache=cache)[0])
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


def test_kv_cache_continuing_from_an_offset_with_several_tokens():
    ours, _ = tiny_pair()
    idx = torch.randint(0, TINY.vocab_size, (2, 40))
    with torch.no_grad():
        full, _ = ours(idx)
        cache = KVCache(TINY, 2, 40, "cpu", torch.float32)
        parts = [ours(idx[:, a:b], cache=cache)[0] for a, b in [(0, 13), (13, 14), (14, 31), (31, 40)]]
    assert cache.pos == 40
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=0)


def test_generate_greedy_equals_argmax_of_full_recomputation():
    ours, _ = tiny_pair()
    ids = torch.randint(0, TINY.vocab_size, (12,)).tolist()
    out = ours.generate(ids, 20)
    seq = list(ids)
    with torch.no_grad():
        for _ in range(20):
            seq.append(int(ours(torch.tensor([seq]))[0][0, -1].argmax()))
    assert out == seq[len(ids):]


def test_generate_stream_yields_what_generate_returns_and_stops_at_eos():
    ours, _ = tiny_pair()
    ids = [5, 6, 7]
    out = ours.generate(ids, 30)
    assert list(ours.generate_stream(ids, 30)) == out
    eos = out[4]
    stopped = ours.generate(ids, 30, eos_token_id=eos)
    assert stopped == out[:out.index(eos) + 1]


def test_context_longer_than_the_window_is_truncated_not_a_crash():
    ours, _ = tiny_pair()  # window of 128 positions
    long_prompt = torch.randint(0, TINY.vocab_size, (300,)).tolist()
    out = ours.generate(long_prompt, 200)  # prompt and output together overflow the window twice
    assert len(out) == 200
    # the prompt's last 127 tokens decide the first new token
    assert out[0] == ours.generate(long_prompt[-127:], 1)[0]
    with pytest.raises(ValueError, match="empty"):
        ours.generate([], 5)


# ----------------------------------------------------------------------------- sampling
def test_top_k_1_and_tiny_top_p_equal_greedy():
    ours, _ = tiny_pair()
    ids = [1, 2, 3, 4]
    greedy = ours.generate(ids, 25)
    g = torch.Generator().manual_seed(0)
    assert ours.generate(ids, 25, temperature=1.5, top_k=1, generator=g) == greedy
    assert ours.generate(ids, 25, temperature=1.5, top_p=1e-6, generator=g) == greedy


def test_same_seed_same_sample_other_seed_other_sample():
    ours, _ = tiny_pair()
    run = lambda seed: ours.generate([1, 2, 3], 30, temperature=1.0, generator=torch.Generator().manual_seed(seed))
    assert run(123) == run(123)
    assert run(123) != run(124)


def test_top_k_and_top_p_only_sample_from_the_sets_hf_keeps():
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper
    torch.manual_seed(0)
    scores = torch.randn(1, 300)
    for kwargs, warper in [({"top_k": 7}, TopKLogitsWarper(7)), ({"top_p": 0.6}, TopPLogitsWarper(0.6))]:
        allowed = set(torch.nonzero(warper(None, scores.clone())[0] > float("-inf")).view(-1).tolist())
        g = torch.Generator().manual_seed(1)
        drawn = {sample(scores[0], 1.0, generator=g, **kwargs) for _ in range(400)}
        assert drawn <= allowed and len(drawn) > 1


def test_repetition_penalty_matches_hf_processor():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor
    ours, hf = tiny_pair()
    ids = [3, 9, 9, 40, 41]
    with torch.no_grad():
        logits = ours(torch.tensor([ids]))[0][0, -1]
    expected = RepetitionPenaltyLogitsProcessor(1.7)(torch.tensor([ids]), logits[None].clone())[0]
    assert not torch.equal(expected, logits)  # the penalty does change seen tokens' logits
    # the first greedy token under the penalty is the argmax of HF's penalised logits
    assert ours.generate(ids, 1, repetition_penalty=1.7) == [int(expected.argmax())]
    # and over a longer run, our penalised greedy decoding equals HF generate's
    ref = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                      max_new_tokens=30, do_sample=False, eos_token_id=None, pad_token_id=0, repetition_penalty=1.7)
    assert ours.generate(ids, 30, repetition_penalty=1.7) == ref[0, len(ids):].tolist()


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


PRINT_1_7B = f"""
import runpy, sys
sys.argv = ["model.py", "--model", "smollm2-1.7b"]
runpy.run_path({os.path.join(ROOT, "model.py")!r}, run_name="__main__")
sys.path.insert(0, {ROOT!r})
from smollm2 import devices
print("peak RSS MB", devices.peak_memory("cpu") // 2**20)  # VmHWM: ru_maxrss would count pytest's own
"""


def test_model_py_prints_the_1_7b_breakdown_without_allocating_its_weights():
    out = subprocess.run([sys.executable, "-c", PRINT_1_7B], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "1,711,376,384" in out.stdout and "rope_theta': 130000.0" in out.stdout
    assert int(out.stdout.split("peak RSS MB")[-1]) < 2000  # its fp32 weights alone are 6.8 GB


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


@pytest.mark.slow
def test_compiled_decode_step_matches_eager_logits_and_greedy_tokens():
    model = tiny_model()
    prompt = torch.randint(0, TINY.vocab_size, (20,)).tolist()
    with torch.inference_mode():
        cache = KVCache(TINY, 1, 64, "cpu", torch.float32)
        model.hidden_states(torch.tensor([prompt]), cache)
        idx, positions = torch.tensor([[7]]), torch.tensor([cache.pos])
        eager = model.decode_step(idx, positions, cache)
        compiled = model.compiled_decode_step()(idx, positions, cache)
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    assert model.generate(prompt, 40, compile=True) == model.generate(prompt, 40)
    # past the window (128 positions) the cache restarts; compiled and eager still agree
    long_prompt = torch.randint(0, TINY.vocab_size, (100,)).tolist()
    assert model.generate(long_prompt, 60, compile=True) == model.generate(long_prompt, 60)
    # a cache of a given size (as the Space asks for): roomier, the same tokens; smaller than prompt
    # and answer, the prompt keeps its last 63 tokens and the cache restarts, compiled as eager
    assert model.generate(prompt, 40, compile=True, cache_len=128) == model.generate(prompt, 40)
    small = model.generate(long_prompt, 60, compile=True, cache_len=64)
    assert small == model.generate(long_prompt, 60, cache_len=64)
    assert small[:1] == model.generate(long_prompt[-63:], 1)


@pytest.mark.slow
def test_compiled_decode_step_follows_weights_changed_after_it_was_built():
    # the guards skip unchanged module dicts (recursive dict tags): new values, a new dtype
    # (model.to swaps each tensor's .data, no dict changes) and a new Parameter must still count
    model, other = tiny_model(), tiny_model(seed=1)
    prompt = torch.randint(0, TINY.vocab_size, (20,)).tolist()

    def step_logits():
        out = []
        for step in (model.compiled_decode_step(), model.decode_step):
            dtype = model.lm_head.weight.dtype
            with torch.inference_mode():
                cache = KVCache(TINY, 1, 64, "cpu", dtype)
                model.hidden_states(torch.tensor([prompt]), cache)
                out.append(step(torch.tensor([[7]]), torch.tensor([cache.pos]), cache).float())
        return out

    compiled, eager = step_logits()
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    model.load_state_dict(other.state_dict())  # new values in the same tensors
    before, (compiled, eager) = eager, step_logits()
    assert not torch.allclose(eager, before, atol=1e-3)  # the change shows in the logits
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    model.to(torch.bfloat16)  # a new dtype under every parameter
    compiled, eager = step_logits()
    assert torch.allclose(compiled, eager, atol=0.05, rtol=0.02)
    norm = model.model.layers[0].input_layernorm
    norm.weight = torch.nn.Parameter(torch.full_like(norm.weight, 3.0))  # a new Parameter object
    compiled, eager = step_logits()
    assert torch.allclose(compiled, eager, atol=0.05, rtol=0.02)
    assert model.generate(prompt, 20, compile=True) == model.generate(prompt, 20)


@pytest.mark.slow
def test_compiled_bf16_decode_step_is_as_close_to_fp32_as_eager_bf16():
    # the streaming products in bf16 accumulate in fp32 and round once, as F.linear does in eager
    prompt = torch.randint(0, TINY.vocab_size, (20,), generator=torch.Generator().manual_seed(1))
    logits = {}
    for name, dtype, compiled in (("fp32", torch.float32, False), ("eager", torch.bfloat16, False),
                                  ("compiled", torch.bfloat16, True)):
        model = tiny_model().to(dtype)
        with torch.inference_mode():
            cache = KVCache(TINY, 1, 64, "cpu", dtype)
            model.hidden_states(prompt[None], cache)
            step = model.compiled_decode_step() if compiled else model.decode_step
            logits[name] = step(torch.tensor([[7]]), torch.tensor([cache.pos]), cache).float()
    scale = logits["fp32"].abs().max()
    err_eager = (logits["eager"] - logits["fp32"]).abs().max()
    err_compiled = (logits["compiled"] - logits["fp32"]).abs().max()
    assert err_eager < 0.05 * scale  # bf16 itself: a few bf16 roundings of the logits' scale
    assert err_compiled <= 1.5 * err_eager, (err_compiled, err_eager)


# ----------------------------------------------------------------------------- attention kernel choice
@pytest.mark.parametrize("device, dtype, masked, head_dim, capability, in_kernel", [
    ("cpu", torch.float32, False, 64, None, True),  # the CPU flash kernel reads grouped heads
    ("cpu", torch.bfloat16, True, 64, None, True),
    ("cuda", torch.bfloat16, False, 64, (8, 0), True),  # A100: flash
    ("cuda", torch.float16, False, 64, (9, 0), True),  # H100/H200: flash
    ("cuda", torch.float16, False, 64, (7, 5), False),  # T4: no flash; the efficient kernel needs equal heads
    ("cuda", torch.float32, False, 64, (9, 0), False),  # fp32: no flash on any GPU
    ("cuda", torch.bfloat16, True, 64, (9, 0), False),  # a mask (generation): no flash
    ("cuda", torch.bfloat16, False, 60, (9, 0), False),  # head_dim not a multiple of 8
    ("cuda", torch.bfloat16, False, 512, (9, 0), False),  # head_dim over 256
    ("cuda", torch.bfloat16, False, 64, None, False),  # capability unknown: the safe way
    ("mps", torch.float32, False, 64, None, False)])
def test_gqa_runs_in_the_kernel_only_where_the_kernel_reads_grouped_heads(device, dtype, masked, head_dim,
                                                                         capability, in_kernel):
    from model import gqa_in_kernel
    assert gqa_in_kernel(device, dtype, masked, head_dim, capability) is in_kernel


def test_the_repeated_kv_path_gives_the_grouped_paths_logits_and_gradients(monkeypatch):
    """What a T4 or an fp32 GPU run takes (K/V repeated, no enable_gqa), run here on CPU."""
    import model as model_module
    idx = torch.randint(0, TINY.vocab_size, (2, 16))
    results = []
    for in_kernel in (True, False):
        monkeypatch.setattr(model_module, "gqa_in_kernel", lambda *facts: in_kernel)
        m = tiny_model()
        logits = m(idx)[0]  # (logits, loss)
        logits.square().mean().backward()
        results.append((logits, m.model.layers[0].self_attn.k_proj.weight.grad))
    (a, ga), (b, gb) = results
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-6)


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
