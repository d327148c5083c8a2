"""Zero-shot tasks (smollm2/zero_shot.py, eval.py --tasks): eval.py's per-row predictions on the real
weights equal those of an independent implementation of CORE's rules with transformers' model and
tokenizer, on each layout; bad task files are one line."""
import json
import os
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import ROOT, assert_one_line_error, run_cmd, tiny_model
from smollm2 import zero_shot
from smollm2.errors import DataError, UsageError
from smollm2.tokenizer import load_tokenizer

EVAL_PY = os.path.join(ROOT, "eval.py")
SCHEMA_ROWS = [  # Winogrande-like: one continuation after each of two contexts
    {"context_options": ["The trophy did not fit in the suitcase because the trophy",
                         "The trophy did not fit in the suitcase because the suitcase"],
     "continuation": "was too big.", "gold": 0},
    {"context_options": ["Anna poured water from the bottle into the cup until the bottle",
                         "Anna poured water from the bottle into the cup until the cup"],
     "continuation": "was full.", "gold": 1},
    {"context_options": ["The fish ate the worm because the fish", "The fish ate the worm because the worm"],
     "continuation": "was hungry.", "gold": 0},
    {"context_options": ["Sam could not lift his son because Sam", "Sam could not lift his son because his son"],
     "continuation": "was so weak.", "gold": 0},
    {"context_options": ["The city council refused the demonstrators a permit because the council",
                         "The city council refused the demonstrators a permit because the demonstrators"],
     "continuation": "feared violence.", "gold": 0},
    {"context_options": ["I put the cake away in the fridge because the fridge",
                         "I put the cake away in the fridge because the cake"],
     "continuation": "has a lot of butter in it.", "gold": 1}]


@pytest.fixture(scope="module")
def hf_tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(os.path.join(ROOT, "tokenizer"))


def oracle(model, tokenizer, layout, rows, delimiter):
    """CORE's rules written again, plainly: transformers' tokenizer and model, one text at a time,
    the whole logits."""
    def ids(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    def loss_and_greedy(seq, start):
        with torch.no_grad():
            logits = model(torch.tensor([seq])).logits[0, start - 1:len(seq) - 1]
        target = torch.tensor(seq[start:])
        return F.cross_entropy(logits, target).item(), bool((logits.argmax(-1) == target).all())

    out = []
    for row in rows:
        if layout == "language_modeling":
            context = row["context"].strip()
            whole, head = ids(context + delimiter + row["continuation"]), ids((context + delimiter).strip())
            assert whole[:len(head)] == head
            out.append(loss_and_greedy(whole, len(head))[1])
            continue
        if layout == "multiple_choice":
            seqs = [ids(row["query"] + delimiter + c) for c in row["choices"]]
            start = 0
            while all(len(s) > start and s[start] == seqs[0][start] for s in seqs):
                start += 1
            starts = [start] * len(seqs)
        else:
            seqs = [ids(o + delimiter + row["continuation"]) for o in row["context_options"]]
            suffix = 0
            while all(len(s) > suffix and s[-1 - suffix] == seqs[0][-1 - suffix] for s in seqs):
                suffix += 1
            starts = [len(s) - suffix for s in seqs]
        losses = [loss_and_greedy(s, start)[0] for s, start in zip(seqs, starts)]
        out.append(losses.index(min(losses)))
    return out


@pytest.mark.parametrize("name, rows", [("arc_easy", 12), ("piqa", 8), ("lambada_openai", 12)])
def test_predictions_equal_an_independent_implementation_with_transformers(real_model, hf_real_model,
                                                                          hf_tokenizer, name, rows):
    task = zero_shot.load_task(name, limit=rows)
    zero_shot.score_task(real_model, load_tokenizer(), task, "cpu", "fp32")
    assert task.results == oracle(hf_real_model, hf_tokenizer, task.layout, task.rows, task.delimiter)


def test_a_schema_task_from_rows_written_here(tmp_path, real_model, hf_real_model, hf_tokenizer):
    path = tmp_path / "winograd.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in SCHEMA_ROWS))
    task = zero_shot.load_task(str(path))
    assert task.layout == "schema" and task.chance == 0.5 and task.delimiter == " "
    scores = zero_shot.score_task(real_model, load_tokenizer(), task, "cpu", "fp32")
    assert task.results == oracle(hf_real_model, hf_tokenizer, "schema", SCHEMA_ROWS, " ")
    assert scores["rows"] == 6 and scores["accuracy"] == sum(
        p == r["gold"] for p, r in zip(task.results, SCHEMA_ROWS)) / 6


def test_a_language_modelling_row_whose_delimiter_leaves_a_trailing_space(real_model, hf_real_model, hf_tokenizer,
                                                                          tmp_path):
    """context ends in a space and the delimiter is one more: the scored tokens start after the
    tokens of (context.strip() + delimiter).strip(), so the space goes with the continuation."""
    rows = [{"context": "The capital of France is ", "continuation": "Paris"},
            {"context": "One, two, three, four, ", "continuation": "five"},
            {"context": "Roses are red, violets are ", "continuation": "blue"}]
    path = tmp_path / "lm.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    task = zero_shot.load_task(str(path), delimiter=" ")
    tokenizer = load_tokenizer()
    texts = zero_shot.row_texts(task, rows[0], lambda t: tokenizer.encode(t).ids)
    (seq, start, end), = texts
    assert tokenizer.decode(seq[start:end]) == " Paris"  # the space is scored, not dropped
    zero_shot.score_task(real_model, tokenizer, task, "cpu", "fp32")
    assert task.results == oracle(hf_real_model, hf_tokenizer, "language_modeling", rows, " ")


def test_bf16_scoring_keeps_most_predictions_of_fp32(real_model):
    task = zero_shot.load_task("arc_easy", limit=24)
    tokenizer = load_tokenizer()
    zero_shot.score_task(real_model, tokenizer, task, "cpu", "fp32")
    fp32 = task.results
    zero_shot.score_task(real_model, tokenizer, task, "cpu", "bf16")
    assert sum(a == b for a, b in zip(fp32, task.results)) >= 20  # close choices may flip


def test_scoring_leaves_the_mode_and_the_random_state_as_they_were():
    model = tiny_model().train()
    state = torch.get_rng_state()
    zero_shot.score_task(model, type("Tok", (), {"encode": lambda self, t: type("E", (), {"ids": [
        ord(c) % 500 for c in t]})()})(), zero_shot.load_task("openbook_qa", limit=3), "cpu")
    assert model.training and torch.equal(torch.get_rng_state(), state)


class Rank:
    """A distributed.Process's rank of a world whose other ranks' counts all_sum adds here."""
    def __init__(self, rank, world, others=0.0):
        self.rank, self.world, self.others = rank, world, others

    def all_sum(self, t):
        return t + self.others


def test_ranks_score_every_world_th_row_by_length_and_add_up_to_the_one_process_accuracy():
    model, task = tiny_model().eval(), zero_shot.load_task("arc_easy", limit=9)
    tokenizer = type("Tok", (), {"encode": lambda self, t: type("E", (), {"ids": [ord(c) % 500 for c in t]})()})()
    alone = zero_shot.score_task(model, tokenizer, task, "cpu")
    whole = list(task.results)
    correct = lambda results: sum(r == row["gold"] for r, row in zip(results, task.rows) if r is not None)
    parts = []
    for rank in (0, 1, 2):
        zero_shot.score_task(model, tokenizer, task, "cpu", proc=Rank(rank, 3))
        parts.append(list(task.results))
    assert all(sum(p[i] is not None for p in parts) == 1 for i in range(9))  # each row on one rank
    assert [sum(r is not None for r in p) for p in parts] == [3, 3, 3]
    assert [next(r for r in column if r is not None) for column in zip(*parts)] == whole  # as scored alone
    others = correct(parts[1]) + correct(parts[2])
    assert zero_shot.score_task(model, tokenizer, task, "cpu", proc=Rank(0, 3, others))["accuracy"] == alone["accuracy"]


def test_passes_are_sized_for_the_device():
    assert zero_shot.tokens_per_pass("cpu") == zero_shot.tokens_per_pass("mps") == 4096
    assert zero_shot.tokens_per_pass("cuda") >= 8 * zero_shot.tokens_per_pass("cpu")


def test_shared_tokens_run_once_and_give_each_text_the_losses_it_has_alone():
    model = tiny_model().eval()  # rows of unequal shared lengths (left padding), a choice that is all
    rows = [[([5, 6, 7, 8], 3, 4), ([5, 6, 7, 9, 10], 3, 5), ([5, 6, 7], 2, 3)],  # prefix, one text
            [([1, 2, 3, 4, 5, 6, 7], 5, 7), ([1, 2, 3, 4, 5, 8], 5, 6)]]  # longer than another's
    texts = [t for row in rows for t in row]
    assert [zero_shot.shared_tokens(row) for row in rows] == [2, 5]
    with torch.inference_mode():
        hidden, where = zero_shot.shared_pass(model, rows, "cpu")
        losses, greedy = zero_shot.score_positions(model, hidden, where, texts)
        for (s, start, end), loss, right in zip(texts, losses, greedy):
            logits = model(torch.tensor([s]))[0][0, start - 1:end - 1]
            assert loss == pytest.approx(F.cross_entropy(logits, torch.tensor(s[start:end])).item(), abs=1e-5)
            assert right == bool((logits.argmax(-1) == torch.tensor(s[start:end])).all())
        assert hidden.shape[0] == 2 * 5 + 5 * 3  # 2 rows x 5 shared, 5 texts x 3 of their own: not 5 x 7
        window = model.config.max_position_embeddings  # a batch the two passes would outgrow: one pass
        assert zero_shot.shared_pass(model, [[([1] * window, window - 1, window), ([1] * (window - 1) + [2], window - 1, window)],
                                             [([3, 4] + [5] * (window - 2), 1, window), ([3, 5], 1, 2)]], "cpu") is None
        assert zero_shot.shared_pass(model, [[([1, 2], 1, 2), ([3, 4], 1, 2)]], "cpu") is None  # nothing shared


def test_rules_prefix_suffix_layout_and_the_centred_average():
    assert zero_shot.common_prefix([[1, 2, 3], [1, 2, 4, 5], [1, 2]]) == 2
    assert zero_shot.common_suffix([[9, 2, 3], [1, 2, 3], [3]]) == 1
    assert zero_shot.detect_layout({"query": "q", "choices": [], "gold": 0}, "x") == "multiple_choice"
    assert zero_shot.detect_layout({"context": "c", "continuation": "d"}, "x") == "language_modeling"
    assert zero_shot.detect_layout({"context_options": [], "continuation": "d", "gold": 0}, "x") == "schema"
    scores = {"a": {"accuracy": 0.5, "chance": 0.25}, "b": {"accuracy": 0.3, "chance": 0.0}}
    assert zero_shot.centred(scores) == pytest.approx(((0.5 - 0.25) / 0.75 + 0.3) / 2)
    assert zero_shot.parse_tasks("core") == [(name, None) for name in zero_shot.TASKS]
    assert zero_shot.parse_tasks("piqa:100, arc_easy", limit=5) == [("piqa", 100), ("arc_easy", 5)]
    with pytest.raises(UsageError, match="'hellaswag': not a task name"):
        zero_shot.parse_tasks("hellaswag")


def test_eval_py_prints_the_table_and_writes_every_rows_result(tmp_path, gguf_path):
    proc = run_cmd(tmp_path, sys.executable, EVAL_PY, gguf_path, "--tasks", "arc_easy,lambada_openai", "--limit",
                   "6", "--json", "out.json", timeout=300)
    lines = proc.stdout.splitlines()
    assert lines[1].split() == ["task", "rows", "accuracy", "chance"] and lines[-1].startswith("centred average")
    assert lines[2].split()[:2] == ["arc_easy", "6"] and lines[3].split()[:2] == ["lambada_openai", "6"]
    record = json.loads((tmp_path / "out.json").read_text())
    arc, lambada = record["tasks"]["arc_easy"], record["tasks"]["lambada_openai"]
    assert len(arc["results"]) == 6 and all(r in range(4) for r in arc["results"])
    assert len(lambada["results"]) == 6 and all(isinstance(r, bool) for r in lambada["results"])
    assert arc["accuracy"] == sum(p == json.loads(line)["gold"] for p, line in zip(
        arc["results"], open(os.path.join(zero_shot.TASK_DIR, "arc_easy.jsonl")))) / 6


@pytest.mark.parametrize("content, names", [
    ("not json at all\n", ["line 1", "not JSON"]),
    ('{"question": "q", "answer": "a"}\n', ["line 1", "no known layout", "question, answer"]),
    ('{"query": "q", "choices": ["a", "b"], "gold": 2}\n', ["line 1", "gold 2", "2 options"]),
    ("", ["no rows"]),
    ('{"query": "q", "choices": ["a", "b"], "gold": 0}\n{"context": "c", "continuation": "d"}\n',
     ["line 2", "language_modeling row in a multiple_choice file"])],
    ids=["not-jsonl", "no-layout", "gold-out-of-range", "empty", "mixed"])
def test_a_bad_task_file_is_one_line_and_exit_2(tmp_path, content, names):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(DataError):
        zero_shot.load_task(str(path))
    proc = run_cmd(tmp_path, sys.executable, EVAL_PY, "no-model-needed.gguf", "--tasks", path, status=2)
    assert_one_line_error(proc, "eval.py", *names)


def test_an_unknown_task_or_no_task_and_no_data_is_one_line(tmp_path):
    proc = run_cmd(tmp_path, sys.executable, EVAL_PY, "x.gguf", "--tasks", "arc_easy,hellaswag", status=2)
    assert_one_line_error(proc, "eval.py", "'hellaswag'", "core")
    proc = run_cmd(tmp_path, sys.executable, EVAL_PY, "x.gguf", status=2)
    assert_one_line_error(proc, "eval.py", "--data", "--tasks")


# ----------------------------------------------------------------------------- during training
def test_train_scores_eval_tasks_at_evaluation_steps_into_metrics_tensorboard_and_a_second_plot_panel(tmp_path,
                                                                                                     corpus):
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from conftest import TINY, losses, read_metrics, run_train
    args = [*TINY, "--data", corpus, "--steps", 4, "--eval-interval", 2, "--ckpt-interval", 2,
            "--eval-tasks", "piqa:6,openbook_qa:4"]
    proc = run_train(tmp_path, *args, "--save", "a/c.pt", "--tensorboard", "tb")
    assert "step 0 | piqa " in proc.stdout and " | openbook_qa " in proc.stdout
    records = {r["step"]: r for r in read_metrics(tmp_path / "a/c_metrics.jsonl")}
    assert {s for s, r in records.items() if "acc_piqa" in r} == {2, 4}
    assert all(r["acc_piqa"] in {k / 6 for k in range(7)} and r["acc_openbook_qa"] in {0, .25, .5, .75, 1}
               for r in records.values() if "acc_piqa" in r)
    events = EventAccumulator(str(tmp_path / "tb")).Reload()
    assert [(e.step, e.value) for e in events.Scalars("eval/acc_piqa")] == [
        (s, pytest.approx(records[s]["acc_piqa"])) for s in (2, 4)]
    assert Image.open(tmp_path / "a/c_loss.png").size[1] > 800  # two panels: loss, then accuracy
    run_train(tmp_path, *args, "--ckpt", "a/c_step_2.pt", "--save", "b/c.pt", "--metrics", "b/m.jsonl")
    resumed = {r["step"]: r for r in read_metrics(tmp_path / "b/m.jsonl")}
    assert losses(tmp_path / "b/m.jsonl") == {s: r["loss"] for s, r in records.items() if s > 2}
    assert resumed[4]["acc_piqa"] == records[4]["acc_piqa"]  # exact resume: the same weights, the same answers


def test_a_bad_eval_task_stops_train_py_before_training_with_one_line(tmp_path, corpus):
    from conftest import TINY, run_train
    proc = run_train(tmp_path, *TINY, "--data", corpus, "--steps", 2, "--eval-tasks", "arc_easy,nope", status=2)
    assert_one_line_error(proc, "train.py", "'nope'")
    assert not (tmp_path / "checkpoint.pt").exists()
