"""What train.py prints at start-up and at exit: the model, the data, the batch, precision, compile,
speed-ups and the LR schedule; how to resume after a stop."""


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
