"""sample.py: text from any weights on the command line, with the Space's settings. Greedy output is
the engine's generate decoded, a seed makes a sample repeatable, the real Instruct model answers a
question through its chat template, and bad input is one line with exit status 2."""
import os
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch

from conftest import ROOT, TRAIN_ENV, assert_one_line_error, peaked_tiny_preset, run_cmd
from model import SmolLM2
from smollm2 import engine
from smollm2.tokenizer import load_tokenizer

SAMPLE_PY = os.path.join(ROOT, "sample.py")


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A tiny-preset checkpoint with peaked predictions."""
    model = peaked_tiny_preset()
    path = tmp_path_factory.mktemp("sample") / "checkpoint.pt"
    torch.save({"model": model.state_dict(), "config": asdict(model.config), "step": 5}, path)
    return path


def sample(cwd, *args, status=0):
    return run_cmd(cwd, sys.executable, SAMPLE_PY, *args, status=status)


def test_greedy_sample_is_the_prompt_and_model_generates_greedy_tokens_decoded(tmp_path, tiny_checkpoint):
    proc = sample(tmp_path, tiny_checkpoint, "--prompt", "ROMEO:", "--max-new-tokens", 40, "--temperature", 0,
                  "--repetition-penalty", 1.0, "--device", "cpu")
    model, tok = SmolLM2.from_pretrained(tiny_checkpoint).eval(), load_tokenizer()
    new = engine.generate(model, tok.encode("ROMEO:").ids, 40, temperature=0.0, eos_token_id=model.config.eos_token_id)
    assert len(new) > 10 and proc.stdout == "ROMEO:" + tok.decode(new) + "\n"
    penalised = engine.generate(model, tok.encode("ROMEO:").ids, 40, temperature=0.0, repetition_penalty=1.1,
                                eos_token_id=model.config.eos_token_id)
    proc = sample(tmp_path, tiny_checkpoint, "--prompt", "ROMEO:", "--max-new-tokens", 40, "--temperature", 0)
    assert proc.stdout == "ROMEO:" + tok.decode(penalised) + "\n"  # the Space's default penalty, 1.1


def test_the_same_seed_gives_the_same_samples_and_another_seed_others(tmp_path, tiny_checkpoint):
    def draw(seed):
        return sample(tmp_path, tiny_checkpoint, "--prompt", "ROMEO:", "--max-new-tokens", 24, "--seed", seed,
                      "--num-samples", 2, "--temperature", 1.0).stdout
    first = draw(7)
    assert first == draw(7) and first != draw(8)
    one, two = first.split("\n---------------\n")
    assert one.startswith("ROMEO:") and two.startswith("ROMEO:") and one != two  # each sample draws anew


def test_several_prompts_are_generated_together_each_as_it_would_be_alone(tmp_path, tiny_checkpoint):
    args = ["--max-new-tokens", 20, "--seed", 3, "--temperature", 1.0]
    together = sample(tmp_path, tiny_checkpoint, "--prompt", "ROMEO:", "--prompt", "JULIET: O Romeo", *args).stdout
    alone = [sample(tmp_path, tiny_checkpoint, "--prompt", p, *args).stdout for p in ("ROMEO:", "JULIET: O Romeo")]
    assert together.split("\n---------------\n") == [a.rstrip("\n") for a in alone[:1]] + alone[1:]


def test_train_pys_sample_settings_draw_train_pys_samples(tmp_path, tiny_checkpoint):
    """docs/training.md says these flags give the samples train.py prints (sample_text)."""
    from smollm2.sampling import sample_text
    proc = sample(tmp_path, tiny_checkpoint, "--prompt", "ROMEO:\n", "--max-new-tokens", 30, "--temperature", 0.8,
                  "--top-k", 50, "--top-p", 1, "--repetition-penalty", 1, "--seed", 1337)
    model = SmolLM2.from_pretrained(tiny_checkpoint).eval()
    assert proc.stdout == sample_text(model, "ROMEO:\n", 30, 1337, temperature=0.8, top_k=50) + "\n"


def test_weights_trained_on_conversations_answer_through_the_chat_template_without_chat(tmp_path, tiny_checkpoint):
    ckpt = torch.load(tiny_checkpoint, weights_only=True)
    ckpt["data"] = {"conversations": True}  # as ConversationLoader's state records it
    torch.save(ckpt, tmp_path / "chat.pt")
    args = ["--prompt", "ROMEO:", "--max-new-tokens", 20, "--temperature", 0]
    marked = sample(tmp_path, tmp_path / "chat.pt", *args).stdout
    assert marked == sample(tmp_path, tiny_checkpoint, *args, "--chat").stdout  # the same as --chat asks
    assert not marked.startswith("ROMEO:") and sample(tmp_path, tiny_checkpoint, *args).stdout.startswith("ROMEO:")


@pytest.mark.slow
def test_the_real_instruct_model_answers_through_its_chat_template(tmp_path, gguf_path):
    proc = sample(tmp_path, gguf_path, "--prompt", "What is the capital of France?", "--temperature", 0,
                  "--max-new-tokens", 24)
    assert "Paris" in proc.stdout and "<|im_" not in proc.stdout and "What is" not in proc.stdout


@pytest.mark.parametrize("args, message", [
    (["missing.pt", "--prompt", "hi"], "missing.pt: no such file or directory"),
    (["{ckpt}", "--prompt", ""], "--prompt is empty"),
    (["{ckpt}"], "the following arguments are required: --prompt"),
    (["{ckpt}", "--prompt", "hi", "--temperature", "-1"], "--temperature: must be >= 0, got -1"),
    (["{ckpt}", "--prompt", "hi", "--top-p", "1.5"], "--top-p: must be > 0 and <= 1, got 1.5"),
    (["{ckpt}", "--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens: must be > 0"),
    (["{ckpt}", "--prompt", "hi", "--num-samples", "two"], "--num-samples: invalid int value: 'two'"),
    (["{ckpt}", "--prompt", "hi", "--repetition-penalty", "nan"], "--repetition-penalty: must be > 0"),
    (["{ckpt}", "--prompt", "hi", "--seed", str(2**64)], "--seed: must be below 2**64"),
    (["{ckpt}", "--prompt", "hi", "--device", "tpu"], "--device tpu: not available here"),
    (["{ckpt}", "--prompt", "hi", "--prompt", "ho", "--num-samples", "2"], "with several prompts give one each"),
    (["{ckpt}", "--prompt", "hi", "--prompt", ""], "--prompt is empty"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, tiny_checkpoint, args, message):
    args = [a.format(ckpt=tiny_checkpoint) for a in args]
    proc = sample(tmp_path, *args, status=2)
    assert_one_line_error(proc, "sample.py", message)
    assert proc.stdout == ""


def test_a_reader_that_stops_early_is_no_error(tmp_path, tiny_checkpoint):
    """`python sample.py ... | head -c 10`: the closed pipe ends the sampling quietly, status 0."""
    proc = subprocess.Popen([sys.executable, SAMPLE_PY, tiny_checkpoint, "--prompt", "ROMEO:", "--max-new-tokens",
                             "200", "--num-samples", "5"], cwd=tmp_path, env=TRAIN_ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert proc.stdout.read(6) == b"ROMEO:"
    proc.stdout.close()
    assert proc.wait(timeout=300) == 0 and proc.stderr.read() == b""


def test_a_model_whose_vocabulary_is_not_the_tokenizers_is_one_line(tmp_path):
    from conftest import tiny_model
    model = tiny_model()  # 512 tokens: "ROMEO:" encodes to ids past its embedding
    torch.save({"model": model.state_dict(), "config": asdict(model.config)}, tmp_path / "small.pt")
    proc = sample(tmp_path, tmp_path / "small.pt", "--prompt", "ROMEO:", status=2)
    assert_one_line_error(proc, "sample.py", "512", "49152")


@pytest.mark.parametrize("prompt", ["What is the capital of France?", " leading space, café 🤗\n", "<|im_end|> in it"])
def test_the_chat_wrapping_is_the_chat_templates_prompt_as_transformers_renders_it(prompt):
    """sample.py's --chat prompt (sampling.chat_wrap around the prompt's ids) is what transformers'
    apply_chat_template gives for one user turn with a generation prompt: the repo's
    tokenizer/chat_template.jinja rendered (chat.ChatTemplate), transformers as the oracle."""
    from transformers import AutoTokenizer
    from smollm2.sampling import chat_wrap
    tokenizer = load_tokenizer()
    prefix, suffix = chat_wrap(tokenizer)
    hf = AutoTokenizer.from_pretrained(os.path.join(ROOT, "tokenizer"))
    expected = hf.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                      tokenize=True, return_dict=True)["input_ids"]
    assert prefix + tokenizer.encode(prompt).ids + suffix == list(expected)
