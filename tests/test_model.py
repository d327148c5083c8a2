"""model.py against its oracle, transformers' LlamaForCausalLM: shapes, logits, generation, I/O."""
import math
import os
from dataclasses import asdict

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from conftest import ROOT
from model import KVCache, PRESETS, SmolLM2, SmolLM2Config, sample
from weights import ModelLoadError, hf_config_dict
from train_kernels import ChunkedLoss

# A random tiny config that keeps the real model's 3:1 GQA layout (and everything else but size).
TINY = SmolLM2Config(vocab_size=512, hidden_size=96, intermediate_size=160, num_hidden_layers=3,
                     num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=128)
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


def test_gguf_loader_reads_the_real_config(real_model):
    cfg = real_model.config
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (576, 30, 9, 3)
    assert (cfg.vocab_size, cfg.intermediate_size, cfg.rope_theta) == (49152, 1536, 100000.0)
    assert sum(p.numel() for p in real_model.parameters()) == 134_515_008
    assert real_model.lm_head.weight is real_model.model.embed_tokens.weight
    assert real_model.source_info["format"] == "gguf"


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


def test_bf16_save_and_training_checkpoint_load(tmp_path):
    ours, _ = tiny_pair()
    ours.save_pretrained(tmp_path / "bf16", dtype=torch.bfloat16, tokenizer_dir=None)
    loaded = SmolLM2.from_pretrained(tmp_path / "bf16")
    torch.testing.assert_close(loaded.lm_head.weight, ours.lm_head.weight.to(torch.bfloat16).float())
    ckpt = {"model": ours.state_dict(), "config": asdict(TINY), "step": 7, "val_loss": 3.5,
            "optimizer": {"state": {}, "param_groups": []}}
    torch.save(ckpt, tmp_path / "checkpoint.pt")
    loaded = SmolLM2.from_pretrained(tmp_path / "checkpoint.pt")
    assert loaded.source_info["step"] == 7 and loaded.source_info["val_loss"] == 3.5
    torch.testing.assert_close(loaded.state_dict(), ours.state_dict())


def test_hub_id_goes_through_huggingface_hub(tmp_path, monkeypatch):
    import huggingface_hub
    ours, _ = tiny_pair()
    ours.save_pretrained(tmp_path, tokenizer_dir=None)
    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append(repo_id)
        return str(tmp_path)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    loaded = SmolLM2.from_pretrained("HuggingFaceTB/SmolLM2-135M")
    assert calls == ["HuggingFaceTB/SmolLM2-135M"]
    torch.testing.assert_close(loaded.state_dict(), ours.state_dict())


def test_hub_failure_is_a_clear_error(monkeypatch):
    import huggingface_hub

    def offline(repo_id, **kwargs):
        raise OSError("network is unreachable")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(ModelLoadError, match="could not download.*network is unreachable"):
        SmolLM2.from_pretrained("HuggingFaceTB/SmolLM2-135M")


# ----------------------------------------------------------------------------- bad input
def test_missing_path_says_what_was_expected(tmp_path):
    with pytest.raises(ModelLoadError, match="no such file.*expected an HF model directory"):
        SmolLM2.from_pretrained(tmp_path / "nope")
    with pytest.raises(ModelLoadError, match="no config.json"):
        SmolLM2.from_pretrained(tmp_path)  # an existing directory without a model


def test_file_that_is_not_a_model(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello, I am not a model\n")
    with pytest.raises(ModelLoadError, match="not a model file"):
        SmolLM2.from_pretrained(path)
    bogus = tmp_path / "bogus.pt"
    torch.save({"hello": torch.zeros(1)}, bogus)
    with pytest.raises(ModelLoadError, match="not a readable training checkpoint"):
        SmolLM2.from_pretrained(bogus)


def test_truncated_safetensors(tmp_path):
    ours, _ = tiny_pair()
    ours.save_pretrained(tmp_path, tokenizer_dir=None)
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    with pytest.raises(ModelLoadError, match="truncated or corrupt"):
        SmolLM2.from_pretrained(tmp_path)


def test_weights_whose_shapes_do_not_match_the_config(tmp_path):
    ours, _ = tiny_pair()
    ours.save_pretrained(tmp_path, tokenizer_dir=None)
    hf = hf_config_dict(TINY)
    hf["intermediate_size"] = 200  # the config now disagrees with the stored MLP weights
    import json
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ModelLoadError, match=r"weights do not match the config: .*mlp.*\(160, 96\) but the config expects \(200, 96\)"):
        SmolLM2.from_pretrained(tmp_path)


def test_unsupported_architecture_is_named(tmp_path):
    ours, _ = tiny_pair()
    ours.save_pretrained(tmp_path, tokenizer_dir=None)
    import json
    hf = hf_config_dict(TINY) | {"attention_bias": True}
    (tmp_path / "config.json").write_text(json.dumps(hf))
    with pytest.raises(ModelLoadError, match="unsupported config.*attention_bias"):
        SmolLM2.from_pretrained(tmp_path)
