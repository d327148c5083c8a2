"""Text from a model: a prompt in, the prompt and its continuation out, as train.py prints its
samples. The random draws come from a generator of their own, so a run's random state is untouched."""
import torch

from smollm2.tokenizer import EOT_ID, load_tokenizer


def sample_text(model, prompt, max_new_tokens, seed, temperature=0.8, top_k=50, tokenizer=None):
    """The prompt followed by max_new_tokens sampled tokens, as text; model is left in training
    mode if it was."""
    tok = tokenizer or load_tokenizer()
    ids = tok.encode(prompt).ids or [EOT_ID]
    device = model.lm_head.weight.device
    gen = torch.Generator(device).manual_seed(seed)  # leaves the global RNG alone
    training = model.training
    model.eval()
    new = model.generate(ids, max_new_tokens, temperature=temperature, top_k=top_k, generator=gen)
    model.train(training)
    return prompt + tok.decode(new)
