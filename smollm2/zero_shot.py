"""Is the model any good? Zero-shot tasks scored by the rules of CORE (the DCLM suite) as nanochat's
core_eval.py applies them: eval.py --tasks and train.py --eval-tasks.

The shipped tasks (data/eval/, llm-foundry's gauntlet layout, licences beside them) and any JSONL in
that layout, the layout told by each row's keys:
- multiple choice (query, choices, gold): one text per choice, query + delimiter + choice; the
  scored tokens of each are those after the longest token prefix the row's texts share; the
  prediction is the choice with the lowest mean cross-entropy over its scored tokens.
- schema (context_options, continuation, gold; as Winogrande): one text per option, option +
  delimiter + continuation; the scored tokens are the longest token suffix the texts share; the
  lowest mean cross-entropy wins.
- language modelling (context, continuation): context.strip() + delimiter + continuation; the scored
  tokens are those after the tokens of (context.strip() + delimiter).strip(), which must be a token
  prefix; correct when greedy argmax predicts every scored token.
Zero-shot, no BOS token (SmolLM2's tokenizer adds none). A row's texts go through the model with
other rows' (tokens_per_pass: 4,096 on a CPU, more on a GPU); the leading tokens that a multiple
choice row's texts share run once, not once per choice; only the scored positions meet the LM head;
a pass waits for the device once, for its predictions. Under DDP and FSDP each rank scores every
world-th row (train.py's --eval-tasks) and the ranks add up their correct rows.
"""
import json
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from smollm2 import devices
from smollm2.errors import DataError, UsageError

TASK_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "eval")
# name: (file in TASK_DIR, continuation delimiter, chance); delimiters as llm-foundry's tasks_v0.3.yaml
TASKS = {"arc_easy": ("arc_easy.jsonl", "\nAnswer: ", 0.25),
         "arc_challenge": ("arc_challenge.jsonl", "\nAnswer: ", 0.25),
         "piqa": ("piqa.jsonl", "\nAnswer: ", 0.5),
         "openbook_qa": ("openbook_qa.jsonl", " ", 0.25),
         "lambada_openai": ("lambada_openai.jsonl", " ", 0.0)}
SUITES = {"core": list(TASKS)}
LAYOUTS = {"multiple_choice": ("query", "choices", "gold"), "schema": ("context_options", "continuation", "gold"),
           "language_modeling": ("context", "continuation")}
TOKENS_PER_PASS = {"cpu": 4096, "cuda": 32768}  # tokens of one forward pass (rows are never split between passes)


def tokens_per_pass(device_type):
    """Tokens of one scoring pass on this kind of device: a CPU's caches favour small passes; a GPU
    needs large ones to be busy (about 1.2 GB of activations at 32,768 tokens for the 135M model, in
    inference, logits only at the scored positions); MPS takes the CPU's size."""
    return TOKENS_PER_PASS.get(device_type, TOKENS_PER_PASS["cpu"])


@dataclass
class Task:
    name: str
    layout: str
    rows: list
    delimiter: str
    chance: float
    path: str = ""
    results: list = field(default_factory=list)


# ----------------------------------------------------------------------------- tasks and their rows
def parse_tasks(spec, limit=None):
    """[(name or path, rows or None)] of a --tasks / --eval-tasks value: a comma list of shipped
    task names, suite names (core) and JSONL paths, each optionally NAME:ROWS (its first ROWS rows)."""
    out = []
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, rows = item, limit
        head, sep, tail = item.rpartition(":")
        if sep and tail.isdigit():
            name, rows = head, int(tail)
            if rows < 1:
                raise UsageError(f"task {item}: ROWS must be a positive number")
        if name in SUITES:
            out += [(task, rows) for task in SUITES[name]]
        elif name in TASKS or os.path.isfile(name):
            out.append((name, rows))
        else:
            raise UsageError(f"task {name!r}: not a task name ({', '.join([*SUITES, *TASKS])}) nor a JSONL file")
    if not out:
        raise UsageError(f"--tasks {spec!r}: no task given")
    return out


def detect_layout(row, where):
    """The gauntlet layout whose keys the row has, or DataError."""
    if isinstance(row, dict):
        for layout, keys in LAYOUTS.items():
            if all(k in row for k in keys):
                return layout
    keys = ", ".join(row) if isinstance(row, dict) else type(row).__name__
    raise DataError(f"{where}: a row of no known layout (its keys: {keys}); expected query/choices/gold, "
                    "context_options/continuation/gold or context/continuation")


def check_row(row, layout, where):
    """DataError unless the row's fields have the layout's types and gold is an index of the options."""
    options = row.get("choices") if layout == "multiple_choice" else row.get("context_options")
    texts = [row.get("continuation")] if layout != "multiple_choice" else [row.get("query")]
    texts += options if isinstance(options, list) else []
    if layout == "language_modeling":
        texts.append(row.get("context"))
    if layout != "language_modeling" and (not isinstance(options, list) or len(options) < 2):
        raise DataError(f"{where}: needs a list of at least 2 {'choices' if layout == 'multiple_choice' else 'context_options'}")
    if not all(isinstance(t, str) for t in texts):
        raise DataError(f"{where}: its texts must be strings")
    if layout != "language_modeling":
        gold = row.get("gold")
        if not isinstance(gold, int) or isinstance(gold, bool) or not 0 <= gold < len(options):
            raise DataError(f"{where}: gold {gold!r} is not an index of its {len(options)} options")


def load_task(spec, delimiter=None, limit=None):
    """A Task from a shipped task's name or a JSONL path: its rows (the first `limit`), checked."""
    if spec in TASKS:
        file, default_delimiter, chance = TASKS[spec]
        name, path = spec, os.path.join(TASK_DIR, file)
    else:
        name, path, default_delimiter, chance = os.path.splitext(os.path.basename(spec))[0], spec, " ", None
    rows, layout = [], None
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if limit is not None and len(rows) >= limit:
                    break
                if not line.strip():
                    continue
                where = f"{path} line {n}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    raise DataError(f"{where}: not JSON (a task file is JSONL: one JSON object a line)") from None
                kind = detect_layout(row, where)
                if layout is None:
                    layout = kind
                elif kind != layout:
                    raise DataError(f"{where}: a {kind} row in a {layout} file")
                check_row(row, layout, where)
                rows.append(row)
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read it as a UTF-8 JSONL task file ({type(e).__name__})") from None
    if not rows:
        raise DataError(f"{path}: no rows (an empty task file)")
    if chance is None:  # a file of ours: 1/options on average, 0 for language modelling
        chance = 0.0 if layout == "language_modeling" else sum(
            1 / len(r.get("choices") or r["context_options"]) for r in rows) / len(rows)
    return Task(name, layout, rows, default_delimiter if delimiter is None else delimiter, chance, path)


# ----------------------------------------------------------------------------- the rules
def common_prefix(seqs):
    n = min(map(len, seqs))
    return next((i for i in range(n) if any(s[i] != seqs[0][i] for s in seqs)), n)


def common_suffix(seqs):
    return common_prefix([s[::-1] for s in seqs])


def row_texts(task, row, encode):
    """[(token ids, first scored index, end)] of one row, by its layout's rule."""
    d = task.delimiter
    if task.layout == "multiple_choice":
        seqs = [encode(row["query"] + d + choice) for choice in row["choices"]]
        start = common_prefix(seqs)  # a choice that is all prefix (a prefix of another) keeps its last token
        return [(s, min(start, len(s) - 1), len(s)) for s in seqs]
    if task.layout == "schema":
        seqs = [encode(option + d + row["continuation"]) for option in row["context_options"]]
        suffix = max(1, common_suffix(seqs))  # at least the last token: texts may share no suffix token
        return [(s, len(s) - suffix, len(s)) for s in seqs]
    context = row["context"].strip()
    whole, head = encode(context + d + row["continuation"]), encode((context + d).strip())
    if whole[:len(head)] != head:
        raise DataError(f"{task.path}: a row whose context does not tokenise as a prefix of context + "
                        f"continuation: {context[-40:]!r} + {row['continuation'][:40]!r}")
    return [(whole, len(head), len(whole))]


def score_task(model, tokenizer, task, device, dtype="fp32", proc=None):
    """Score the rows of task with model (a SmolLM2) in `dtype` ("fp32" or "bf16" autocast);
    task.results gets each row's prediction (a choice index, or True/False; None for the rows another
    rank scored). Returns {"accuracy", "rows", "chance"}, the accuracy over every row. proc (a
    distributed.Process of several ranks): this rank scores rows rank, rank + world, ... of the rows
    sorted by length, and the ranks add up their counts (a collective: every rank calls this). The
    model must then run without collectives (DDP's does; FSDP's: sharding.gathered). Leaves the
    model's mode and every random state as they were."""
    encode = lambda text: tokenizer.encode(text).ids  # noqa: E731
    window = model.config.max_position_embeddings
    # a text longer than the window keeps its last tokens (as core_eval crops); the first token is
    # never scored (nothing predicts it)
    rows = [[(s[-window:], max(1, a - max(0, len(s) - window)), min(b, window)) for s, a, b in row_texts(task, r, encode)]
            for r in task.rows]
    order = sorted(range(len(rows)), key=lambda i: max(len(s) for s, _, _ in rows[i]))  # rows of like
    rank, world = (proc.rank, proc.world) if proc is not None else (0, 1)  # lengths share a pass: little padding
    order = order[rank::world]
    results, batch, budget = [None] * len(rows), [], tokens_per_pass(torch.device(device).type)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(), devices.autocast(torch.device(device).type, dtype):
            for n, i in enumerate(order):
                batch.append(i)
                width = max(len(s) for s, _, _ in rows[i])  # the longest so far: rows come shortest first
                if width * sum(len(rows[j]) for j in batch) >= budget or n == len(order) - 1:
                    for j, result in zip(batch, score_batch(model, [rows[j] for j in batch], task.layout, device)):
                        results[j] = result
                    batch = []
    finally:
        model.train(was_training)
    task.results = results
    correct = sum(r is True or (r is not False and r is not None and r == row["gold"])
                  for r, row in zip(task.results, task.rows))
    if world > 1:
        correct = round(proc.all_sum(torch.tensor(float(correct), device=device)).item())
    return {"accuracy": correct / len(task.rows), "rows": len(task.rows), "chance": task.chance}


def score_batch(model, batch, layout, device):
    """Predictions of the rows in batch. Rows of several texts that share leading tokens (a multiple
    choice question) run those once: shared_pass; the rest run whole in one padded pass."""
    texts = [t for row in batch for t in row]
    shared = shared_pass(model, batch, device) if layout == "multiple_choice" else None
    if shared:
        hidden, where = shared
    else:
        width = max(len(s) for s, _, _ in texts)
        idx = torch.zeros(len(texts), width, dtype=torch.long)
        for j, (s, _, _) in enumerate(texts):
            idx[j, :len(s)] = torch.tensor(s)  # right-padded: causal attention never reads the padding
        hidden = model.hidden_states(devices.to_device(idx, device)).flatten(0, 1)
        where = [[j * width + i for i in range(start - 1, end - 1)] for j, (_, start, end) in enumerate(texts)]
    losses, greedy = score_positions(model, hidden, where, texts)
    out, k = [], 0
    for row in batch:
        if layout == "language_modeling":
            out.append(greedy[k])
        else:
            scores = losses[k:k + len(row)]
            out.append(min(range(len(row)), key=scores.__getitem__))
        k += len(row)
    return out


def shared_tokens(row):
    """How many leading tokens all of a row's texts share and none of them scores."""
    return min(common_prefix([s for s, _, _ in row]), *(start for _, start, _ in row)) if len(row) > 1 else 0


class SharedPrefix:
    """A KV cache for shared_pass: the first pass keeps each row's keys and values, the second reads
    them once for each of the row's texts (rows[j] is text j's row)."""

    def __init__(self):
        self.k, self.v, self.rows = {}, {}, None

    def update(self, layer, k, v, positions):
        if self.rows is None:
            self.k[layer], self.v[layer] = k, v
            return k, v
        return (torch.cat([self.k[layer].index_select(0, self.rows), k], 2),
                torch.cat([self.v[layer].index_select(0, self.rows), v], 2))


def shared_pass(model, batch, device):
    """Final hidden states of the batch's texts, each row's shared tokens run once: a first pass over
    the rows' shared tokens (left-padded to P, so each row's last one sits at P - 1; RoPE depends
    on relative positions only), then one over every text's own tokens after them, reading its row's
    keys and values. Returns (hidden (M, C), where): where[j] lists the rows of hidden at text j's
    positions start - 1 .. end - 2, those that predict its scored tokens. None where a row shares no
    token or the two passes together would outgrow the context window."""
    texts = [t for row in batch for t in row]
    shared = [shared_tokens(row) for row in batch]
    owner = [r for r, row in enumerate(batch) for _ in row]
    P = max(shared)
    S = max(len(s) - shared[r] for (s, _, _), r in zip(texts, owner))
    if min(shared) == 0 or P + S > model.config.max_position_embeddings:
        return None
    head, real = torch.zeros(len(batch), P, dtype=torch.long), torch.zeros(len(batch), P, dtype=torch.bool)
    for r, (row, n) in enumerate(zip(batch, shared)):
        head[r, P - n:], real[r, P - n:] = torch.tensor(row[0][0][:n]), True
    tail = torch.zeros(len(texts), S, dtype=torch.long)
    for j, ((s, _, _), r) in enumerate(zip(texts, owner)):
        tail[j, :len(s) - shared[r]] = torch.tensor(s[shared[r]:])
    causal = torch.ones(P + S, P + S, dtype=torch.bool).tril()
    # padding reads only itself (a query that reads nothing gives NaN, and NaN keys poison the rest)
    head_mask = (causal[:P, :P] & real[:, None, :]) | torch.eye(P, dtype=torch.bool)
    rows = torch.tensor(owner)
    tail_mask = torch.cat([real[rows][:, None, :].expand(-1, S, -1), causal[P:, P:].expand(len(texts), -1, -1)], 2)
    cache = SharedPrefix()
    first = model.trunk(devices.to_device(head, device), torch.arange(P, device=device), devices.to_device(head_mask[:, None], device),
                        cache)
    cache.rows = devices.to_device(rows, device)
    second = model.trunk(devices.to_device(tail, device), torch.arange(P, P + S, device=device),
                         devices.to_device(tail_mask[:, None], device), cache)
    hidden = torch.cat([first.flatten(0, 1), second.flatten(0, 1)])
    where = [[r * P + P - shared[r] + i if i < shared[r] else len(batch) * P + j * S + i - shared[r]
              for i in range(start - 1, end - 1)] for j, ((_, start, end), r) in enumerate(zip(texts, owner))]
    return hidden, where


def score_positions(model, hidden, where, texts):
    """Each text's mean cross-entropy over its scored tokens and whether greedy argmax predicts them
    all, from the rows of hidden (M, C) listed in where[j]: every scored position meets the LM head
    in one (N, C) x (C, V) product. One wait for the device: the two results come back together."""
    device = hidden.device
    text_of = torch.cat([torch.full((len(w),), j) for j, w in enumerate(where)])
    targets = torch.tensor([t for s, start, end in texts for t in s[start:end]])
    picked = torch.tensor([i for w in where for i in w])
    counts = torch.bincount(text_of, minlength=len(texts))
    targets, picked, text_of = (devices.to_device(t, device) for t in (targets, picked, text_of))
    logits = model.lm_head(hidden[picked]).float()
    token_loss = F.cross_entropy(logits, targets, reduction="none").double()
    missed = (logits.argmax(-1) != targets).double()
    sums = torch.zeros(2, len(texts), dtype=torch.float64, device=device)
    sums[0].index_add_(0, text_of, token_loss)
    sums[1].index_add_(0, text_of, missed)
    sums = sums.cpu()  # the pass's one host sync
    losses = sums[0] / counts
    return losses.tolist(), (sums[1] == 0).tolist()


# ----------------------------------------------------------------------------- reporting
def centred(scores):
    """CORE's average: each accuracy above its chance, as a share of the way from chance to 1."""
    return sum((s["accuracy"] - s["chance"]) / (1 - s["chance"]) for s in scores.values()) / len(scores)


def table(scores):
    """The printed table: task, rows, accuracy, chance; then the centred average."""
    lines = [f"{'task':<16} {'rows':>6} {'accuracy':>9} {'chance':>7}"]
    lines += [f"{name:<16} {s['rows']:>6,} {s['accuracy']:>9.4f} {s['chance']:>7.2f}"
              + (f" {s['seconds']:>6.0f} s" if "seconds" in s else "") for name, s in scores.items()]
    lines.append(f"{'centred average':<16} {'':>6} {centred(scores):>9.4f}   (above chance, as CORE averages)")
    return "\n".join(lines)
