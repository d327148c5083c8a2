"""train_kernels.py: the bf16 copy of the weights that CPU bf16 training runs forward and backward
with, against fp32 and bf16 autocast (the same model, the same batch)."""
import torch

from model import SmolLM2, SmolLM2Config
from train_kernels import ChunkedLoss, LowPrecisionWeights

TINY = SmolLM2Config(vocab_size=512, hidden_size=96, intermediate_size=160, num_hidden_layers=3,
                     num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=128)


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_bf16_copy_gives_fp32_gradients_close_to_fp32_and_autocast_and_accumulates_micro_batches():
    torch.manual_seed(0)
    model = SmolLM2(TINY).train()
    loss_fn = ChunkedLoss(model)
    idx = torch.randint(0, TINY.vocab_size, (2, 2, 33))
    loss_fn(idx[0, :, :-1], idx[0, :, 1:]).backward()
    ref = grads(model)  # fp32
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss_fn(idx[0, :, :-1], idx[0, :, 1:]).backward()
    auto = grads(model)
    model.zero_grad(set_to_none=True)
    low = LowPrecisionWeights(loss_fn)
    assert all(p.dtype == torch.bfloat16 for p in low.low) and len(low.low) == len(list(model.parameters()))
    loss = low(idx[0, :, :-1], idx[0, :, 1:])
    loss.backward()
    low.accumulate_grads()
    ours = grads(model)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the masters stay fp32
    assert all(g.dtype == torch.float32 for g in ours.values()) and all(p.grad is None for p in low.low)
    for n in ref:  # bf16 products: within a few bf16 ulps of the gradient's scale, as autocast is
        scale = ref[n].abs().max()
        assert (ours[n] - ref[n]).abs().max() <= 0.05 * scale, n
        assert (auto[n] - ref[n]).abs().max() <= 0.05 * scale, n
    # the tied embedding/lm_head gets both gradients, as in fp32
    assert model.lm_head.weight is model.model.embed_tokens.weight
    # a second micro-batch adds into the fp32 .grad
    low(idx[1, :, :-1], idx[1, :, 1:]).backward()
    second = {n: p.grad.float() for n, p in zip(low.names, low.low)}
    low.accumulate_grads()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ours[n] + second["model." + n])


def test_refresh_copies_the_updated_masters():
    model = SmolLM2(TINY)
    low = LowPrecisionWeights(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    low.refresh()
    for master, copy in zip(model.parameters(), low.low):
        assert torch.equal(copy, master.to(torch.bfloat16))
