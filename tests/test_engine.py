"""smollm2/engine.py: KV-cache generation against full recomputation, model.py's reference generate
and transformers' generate; sampling against HF's processors; the compiled CPU decode step against
the eager one."""
import functools

import pytest
import torch

from conftest import TINY_CONFIG as TINY, tiny_model
from smollm2 import engine
from smollm2.engine import KVCache, sample
from test_model import PROMPTS, tiny_pair, tokenizer  # noqa: F401  (tokenizer: a fixture)


@pytest.mark.slow
def test_real_weights_64_greedy_tokens_match_transformers_generate(real_model, hf_real_model, tokenizer):
    prompts = PROMPTS[:2] + [tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], tokenize=False, add_generation_prompt=True)]
    for prompt in prompts:
        ids = tokenizer(prompt)["input_ids"]
        ours = engine.generate(real_model, ids, 64)  # EOS off in both: all 64 tokens are compared
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
    assert cache.lengths.tolist() == [40, 40]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=0)


def test_generate_greedy_equals_argmax_of_full_recomputation():
    ours, _ = tiny_pair()
    ids = torch.randint(0, TINY.vocab_size, (12,)).tolist()
    out = engine.generate(ours, ids, 20)
    seq = list(ids)
    with torch.no_grad():
        for _ in range(20):
            seq.append(int(ours(torch.tensor([seq]))[0][0, -1].argmax()))
    assert out == seq[len(ids):]


def test_generate_stream_yields_what_generate_returns_and_stops_at_eos():
    ours, _ = tiny_pair()
    ids = [5, 6, 7]
    out = engine.generate(ours, ids, 30)
    assert list(engine.generate_stream(ours, ids, 30)) == out
    eos = out[4]
    stopped = engine.generate(ours, ids, 30, eos_token_id=eos)
    assert stopped == out[:out.index(eos) + 1]


def test_context_longer_than_the_window_is_truncated_not_a_crash():
    ours, _ = tiny_pair()  # window of 128 positions
    long_prompt = torch.randint(0, TINY.vocab_size, (300,)).tolist()
    out = engine.generate(ours, long_prompt, 200)  # prompt and output together overflow the window twice
    assert len(out) == 200
    # the prompt's last 127 tokens decide the first new token
    assert out[0] == engine.generate(ours, long_prompt[-127:], 1)[0]
    with pytest.raises(ValueError, match="empty"):
        engine.generate(ours, [], 5)


# ----------------------------------------------------------------------------- sampling
def test_top_k_1_and_tiny_top_p_equal_greedy():
    ours, _ = tiny_pair()
    ids = [1, 2, 3, 4]
    greedy = engine.generate(ours, ids, 25)
    g = torch.Generator().manual_seed(0)
    assert engine.generate(ours, ids, 25, temperature=1.5, top_k=1, generator=g) == greedy
    assert engine.generate(ours, ids, 25, temperature=1.5, top_p=1e-6, generator=g) == greedy


def test_same_seed_same_sample_other_seed_other_sample():
    ours, _ = tiny_pair()
    run = lambda seed: engine.generate(ours, [1, 2, 3], 30, temperature=1.0, generator=torch.Generator().manual_seed(seed))
    assert run(123) == run(123)
    assert run(123) != run(124)


def test_top_k_and_top_p_only_sample_from_the_sets_hf_keeps():
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper
    torch.manual_seed(0)
    scores = torch.randn(1, 300)
    scores[0, 40] = scores[0, 41] = scores.max() + 0.5  # a tie at the top
    both = lambda ids, s: TopPLogitsWarper(0.5)(ids, TopKLogitsWarper(7)(ids, s))  # noqa: E731 HF's order
    for kwargs, warper in [({"top_k": 7}, TopKLogitsWarper(7)), ({"top_p": 0.6}, TopPLogitsWarper(0.6)),
                           ({"top_k": 7, "top_p": 0.5}, both), ({"top_k": 1}, TopKLogitsWarper(1))]:
        allowed = set(torch.nonzero(warper(None, scores.clone())[0] > float("-inf")).view(-1).tolist())
        g = torch.Generator().manual_seed(1)
        drawn = {sample(scores[0], 1.0, generator=g, **kwargs) for _ in range(400)}
        assert drawn <= allowed and len(drawn) > 1, (kwargs, drawn, allowed)


def test_repetition_penalty_matches_hf_processor():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor
    ours, hf = tiny_pair()
    ids = [3, 9, 9, 40, 41]
    with torch.no_grad():
        logits = ours(torch.tensor([ids]))[0][0, -1]
    expected = RepetitionPenaltyLogitsProcessor(1.7)(torch.tensor([ids]), logits[None].clone())[0]
    assert not torch.equal(expected, logits)  # the penalty does change seen tokens' logits
    # the first greedy token under the penalty is the argmax of HF's penalised logits
    assert engine.generate(ours, ids, 1, repetition_penalty=1.7) == [int(expected.argmax())]
    # and over a longer run, our penalised greedy decoding equals HF generate's
    ref = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                      max_new_tokens=30, do_sample=False, eos_token_id=None, pad_token_id=0, repetition_penalty=1.7)
    assert engine.generate(ours, ids, 30, repetition_penalty=1.7) == ref[0, len(ids):].tolist()


@pytest.mark.slow
def test_compiled_decode_step_matches_eager_logits_and_greedy_tokens():
    model = tiny_model()
    prompt = torch.randint(0, TINY.vocab_size, (20,)).tolist()
    with torch.inference_mode():
        cache = KVCache(TINY, 1, 64, "cpu", torch.float32)
        model.hidden_states(torch.tensor([prompt]), cache)
        idx, positions = torch.tensor([[7]]), cache.lengths[:, None].clone()
        eager = engine.decode_step(model, idx, positions, cache)
        compiled = engine.compiled_decode_step(model)(idx, positions, cache)
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=1e-5)
    assert engine.generate(model, prompt, 40, compile=True) == engine.generate(model, prompt, 40)
    # past the window (128 positions) the cache restarts; compiled and eager still agree
    long_prompt = torch.randint(0, TINY.vocab_size, (100,)).tolist()
    assert engine.generate(model, long_prompt, 60, compile=True) == engine.generate(model, long_prompt, 60)
    # a cache of a given size (as the Space asks for): roomier, the same tokens; smaller than prompt
    # and answer, the prompt keeps its last 63 tokens and the cache restarts, compiled as eager
    assert engine.generate(model, prompt, 40, compile=True, cache_len=128) == engine.generate(model, prompt, 40)
    small = engine.generate(model, long_prompt, 60, compile=True, cache_len=64)
    assert small == engine.generate(model, long_prompt, 60, cache_len=64)
    assert small[:1] == engine.generate(model, long_prompt[-63:], 1)


@pytest.mark.slow
def test_compiled_decode_step_follows_weights_changed_after_it_was_built():
    # the guards skip unchanged module dicts (recursive dict tags): new values, a new dtype
    # (model.to swaps each tensor's .data, no dict changes) and a new Parameter must still count
    model, other = tiny_model(), tiny_model(seed=1)
    prompt = torch.randint(0, TINY.vocab_size, (20,)).tolist()

    def step_logits():
        out = []
        for step in (engine.compiled_decode_step(model), functools.partial(engine.decode_step, model)):
            dtype = model.lm_head.weight.dtype
            with torch.inference_mode():
                cache = KVCache(TINY, 1, 64, "cpu", dtype)
                model.hidden_states(torch.tensor([prompt]), cache)
                out.append(step(torch.tensor([[7]]), cache.lengths[:, None].clone(), cache).float())
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
    assert engine.generate(model, prompt, 20, compile=True) == engine.generate(model, prompt, 20)


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
            step = engine.compiled_decode_step(model) if compiled else functools.partial(engine.decode_step, model)
            logits[name] = step(torch.tensor([[7]]), cache.lengths[:, None].clone(), cache).float()
    scale = logits["fp32"].abs().max()
    err_eager = (logits["eager"] - logits["fp32"]).abs().max()
    err_compiled = (logits["compiled"] - logits["fp32"]).abs().max()
    assert err_eager < 0.05 * scale  # bf16 itself: a few bf16 roundings of the logits' scale
    assert err_compiled <= 1.5 * err_eager, (err_compiled, err_eager)


