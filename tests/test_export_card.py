"""The model card every exported HF directory gets (read back with huggingface_hub's ModelCard), and
--push-to-hub refusing, in one line and without the network, when offline or not logged in."""
import os
import subprocess

import pytest
import torch

from conftest import TRAIN_ENV, load_ckpt, run_train, train_cmd


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, corpus):
    """A tiny run of 4 steps, validated at steps 0, 2 and 4, that started from a hub model."""
    folder = tmp_path_factory.mktemp("card")
    run_train(folder, "--model", "tiny", "--data", corpus, "--steps", 4, "--batch-size", 2, "--seq-len", 32,
              "--eval-iters", 1, "--eval-interval", 2, "--sample-interval", 0, "--ckpt-interval", 0)
    ckpt = load_ckpt(folder / "checkpoint.pt")
    ckpt["args"]["init"] = "HuggingFaceTB/SmolLM2-135M"  # as if fine-tuned from it (no network here)
    torch.save(ckpt, folder / "from_hub.pt")
    return folder / "checkpoint.pt"


def read_card_file(path):
    from huggingface_hub import ModelCard
    return ModelCard.load(path)


def read_card(folder):
    return read_card_file(folder / "README.md")


def test_exported_directory_has_a_model_card_with_metadata_and_the_training_summary(tmp_path, checkpoint):
    run_train(tmp_path, "--export", checkpoint, tmp_path / "out")
    card, ckpt = read_card(tmp_path / "out"), load_ckpt(checkpoint)
    assert card.data.library_name == "transformers" and card.data.license == "apache-2.0"
    assert card.data.pipeline_tag == "text-generation" and "smollm2" in card.data.tags
    assert card.data.base_model is None  # trained from scratch
    history = ckpt["history"]
    assert history["val_step"] == [0, 2, 4]
    assert "| steps | 4 |" in card.text and "| tokens seen | 256 (64 per step) |" in card.text
    assert f"| final validation loss | {history['val_loss'][-1]:.4f} (step 4) |" in card.text
    best = min(history["val_loss"])
    assert f"| best validation loss | {best:.4f} (step {history['val_step'][history['val_loss'].index(best)]}) |" in card.text
    assert "python train.py --steps 4 --data" in card.text and "--model tiny" in card.text
    assert "![training and validation loss](loss.png)" in card.text
    assert (tmp_path / "out" / "loss.png").read_bytes()[:4] == b"\x89PNG"  # copied from the run's plot


def test_a_card_names_the_base_model_of_a_fine_tuned_run_and_draws_a_missing_plot(tmp_path, checkpoint):
    os.remove(checkpoint.parent / "loss.png")  # args.plot is gone: the curve is drawn from history
    run_train(tmp_path, "--export", checkpoint.parent / "from_hub.pt", tmp_path / "out", "--dtype", "fp32")
    card = read_card(tmp_path / "out")
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M"
    assert "`HuggingFaceTB/SmolLM2-135M`" in card.text
    assert (tmp_path / "out" / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_an_existing_readme_such_as_the_spaces_is_kept_and_the_card_goes_beside_it(tmp_path, checkpoint):
    out = tmp_path / "space"
    out.mkdir()
    (out / "README.md").write_text("---\nsdk: gradio\n---\nThe Space\n")
    run_train(tmp_path, "--export", checkpoint, out)
    assert (out / "README.md").read_text() == "---\nsdk: gradio\n---\nThe Space\n"
    assert read_card_file(out / "MODEL_CARD.md").data.library_name == "transformers"
    run_train(tmp_path, "--export", checkpoint, tmp_path / "out")
    run_train(tmp_path, "--export", checkpoint, tmp_path / "out")  # our own card is rewritten in place
    assert not (tmp_path / "out" / "MODEL_CARD.md").exists() and read_card(tmp_path / "out").data.license


def test_a_card_of_a_weights_only_source_says_where_it_came_from(tmp_path, checkpoint):
    run_train(tmp_path, "--export", checkpoint, tmp_path / "first", "--dtype", "fp32")
    run_train(tmp_path, "--export", tmp_path / "first", tmp_path / "second", "--dtype", "fp32")
    card = read_card(tmp_path / "second")
    assert card.data.library_name == "transformers" and "no training run recorded" in card.text


def push(tmp_path, checkpoint, env):
    return subprocess.run(train_cmd("--export", checkpoint, tmp_path / "out", "--push-to-hub", "me/model"),
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def test_push_to_hub_offline_is_one_line_exit_2_and_exports_nothing(tmp_path, checkpoint):
    proc = push(tmp_path, checkpoint, {**TRAIN_ENV, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1
    assert proc.stderr.startswith("train.py: error: --push-to-hub: HF_HUB_OFFLINE is set")
    assert not (tmp_path / "out").exists()


def test_push_to_hub_without_a_login_is_one_line_and_exit_2(tmp_path, checkpoint):
    env = {k: v for k, v in TRAIN_ENV.items() if not k.startswith("HF_") and k != "HUGGING_FACE_HUB_TOKEN"}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="0")  # no stored token, no HF_TOKEN
    proc = push(tmp_path, checkpoint, env)
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1
    assert proc.stderr.startswith("train.py: error: --push-to-hub: not logged in") and "hf auth login" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_push_to_hub_needs_export(tmp_path):
    proc = subprocess.run(train_cmd("--push-to-hub", "me/model"), cwd=tmp_path, env=TRAIN_ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "give --export SRC OUT" in proc.stderr


