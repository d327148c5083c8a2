"""smollm2/model_card.py: the model card every exported HF directory gets (read back with
huggingface_hub's ModelCard): metadata, the training summary, the base model, the loss plot, and
no path of the exporting machine."""
import json
import os

import pytest
import torch

from conftest import load_ckpt, run_export, run_train


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
    run_export(tmp_path, checkpoint, tmp_path / "out")
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
    run_export(tmp_path, checkpoint.parent / "from_hub.pt", tmp_path / "out", "--dtype", "fp32")
    card = read_card(tmp_path / "out")
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M"
    assert "`HuggingFaceTB/SmolLM2-135M`" in card.text
    assert (tmp_path / "out" / "loss.png").read_bytes()[:4] == b"\x89PNG"


def test_an_existing_readme_such_as_the_spaces_is_kept_and_the_card_goes_beside_it(tmp_path, checkpoint):
    out = tmp_path / "space"
    out.mkdir()
    (out / "README.md").write_text("---\nsdk: gradio\n---\nThe Space\n")
    run_export(tmp_path, checkpoint, out)
    assert (out / "README.md").read_text() == "---\nsdk: gradio\n---\nThe Space\n"
    assert read_card_file(out / "MODEL_CARD.md").data.library_name == "transformers"
    run_export(tmp_path, checkpoint, tmp_path / "out")
    run_export(tmp_path, checkpoint, tmp_path / "out")  # our own card is rewritten in place
    assert not (tmp_path / "out" / "MODEL_CARD.md").exists() and read_card(tmp_path / "out").data.license


def test_card_and_training_info_name_files_not_the_exporting_machines_folders(tmp_path, tmp_path_factory,
                                                                               checkpoint):
    """A run fine-tuned from a GGUF given by its absolute path, on data given by its absolute path,
    exported from an absolute path: the card and training_info.json say the file names only."""
    ckpt = load_ckpt(checkpoint)
    ckpt["args"]["init"] = str(tmp_path / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf")
    assert os.path.isabs(ckpt["args"]["data"])  # the corpus fixture's file
    torch.save(ckpt, tmp_path / "from_gguf.pt")
    run_export(tmp_path, tmp_path / "from_gguf.pt", tmp_path / "out")
    card = (tmp_path / "out" / "README.md").read_text()
    info = (tmp_path / "out" / "training_info.json").read_text()
    for text in (card, info):
        assert str(tmp_path_factory.getbasetemp()) not in text  # every path of this test is under it
    assert "`SmolLM2-135M-Instruct.Q4_1.gguf`" in card and "`shakespeare.txt`" in card
    assert "--init SmolLM2-135M-Instruct.Q4_1.gguf" in card and "--data shakespeare.txt" in card
    assert json.loads(info)["source"] == "from_gguf.pt"
    run_export(tmp_path, tmp_path / "out", tmp_path / "again")  # a weights-only source
    assert str(tmp_path) not in (tmp_path / "again" / "README.md").read_text() + \
        (tmp_path / "again" / "training_info.json").read_text()


def test_a_card_of_a_weights_only_source_says_where_it_came_from(tmp_path, checkpoint):
    run_export(tmp_path, checkpoint, tmp_path / "first", "--dtype", "fp32")
    run_export(tmp_path, tmp_path / "first", tmp_path / "second", "--dtype", "fp32")
    card = read_card(tmp_path / "second")
    assert card.data.library_name == "transformers" and "no training run recorded" in card.text


def test_the_cards_command_leaves_out_the_files_named_after_save():
    from smollm2.model_card import train_command
    from smollm2.train_args import build_parser, resolve_args
    args = build_parser().parse_args(["--save", "runs/x/fp32.pt"])
    resolve_args(args, None, 1)
    assert (args.metrics, args.plot) == ("runs/x/fp32_metrics.jsonl", "runs/x/fp32_loss.png")  # the defaults
    assert train_command(vars(args)) == "python train.py --steps 5000 --save runs/x/fp32.pt"
