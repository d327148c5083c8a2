"""Continuous batching (smollm2/batching.py): requests decoded together give what each gives alone
(greedy on the real weights; sampled, by seed, on the tiny model), join and leave the batch at token
boundaries, read long prompts in chunks between decode steps, stop on their own terms, and leave their
slot the step after their reader goes away."""
import pytest
import torch

from conftest import tiny_model
from smollm2 import batching, engine


@pytest.fixture(scope="module")
def model():
    return tiny_model().eval()


def prompt(seed, n):
    return torch.randint(0, 500, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def drain(request):
    out = []
    while (token := request.out.get_nowait() if not request.out.empty() else "empty") not in ("empty", None):
        out.append(token)
    return out


def test_eight_real_conversations_batched_give_each_ones_greedy_answer_alone(real_model):
    """Eight different two-turn conversations of the real SmolLM2-135M-Instruct at temperature 0,
    prompts of unequal lengths read in chunks: the tokens each gets alone (engine.generate). Batching
    may change the order of sums; a token may differ only where the top two logits were within 1e-4."""
    from smollm2.tokenizer import load_tokenizer
    tok = load_tokenizer()
    questions = ["What is the capital of France?", "Name three colours.", "How do birds fly?",
                 "Write a haiku about rain.", "What is 2 plus 2?", "Why is the sky blue?", "Tell me a joke.",
                 "What is Python, the programming language, used for? Answer briefly."]
    prompts = [tok.encode("<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\nHello! How can I help?"
                          f"<|im_end|>\n<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n").ids
               for q in questions]
    batched = batching.generate_batch(real_model, prompts, 24)
    for p, got in zip(prompts, batched):
        alone = engine.generate(real_model, p, 24)
        if got != alone:  # where they part, the alone run's top two logits must have been near ties
            i = next(j for j, (a, b) in enumerate(zip(got, alone)) if a != b)
            top2 = torch.topk(real_model(torch.tensor([p + alone[:i]]))[0][0, -1], 2).values
            assert (top2[0] - top2[1]).item() < 1e-4, (i, got, alone)


def test_sampled_answers_follow_each_requests_own_seed_alone_or_batched(model):
    prompts = [prompt(1, 7), prompt(2, 40), prompt(3, 3)]
    alone = [engine.generate(model, p, 20, temperature=0.9, top_k=50, top_p=0.9,
                             generator=torch.Generator().manual_seed(s)) for p, s in zip(prompts, (5, 6, 7))]
    batcher = batching.Batcher(model, slots=3, context=128)
    requests = [batcher.submit(p, 20, temperature=0.9, top_k=50, top_p=0.9, seed=s) for p, s in zip(prompts, (5, 6, 7))]
    while batcher.step():
        pass
    assert [drain(r) for r in requests] == alone
    assert len({tuple(a) for a in alone}) == 3


def test_a_long_prompt_is_read_in_chunks_while_the_others_keep_decoding(model):
    batcher = batching.Batcher(model, slots=2, context=128, chunk=32)
    busy = batcher.submit(prompt(1, 5), 50)
    batcher.step()  # its prompt read: its first token, and a decode step its second
    assert len(drain(busy)) == 2
    long = batcher.submit(prompt(2, 100), 5)
    for _ in range(3):  # 100 tokens in chunks of 32: four steps, each with a decode step for the other
        assert batcher.step() and len(drain(busy)) == 1 and long.out.empty()
    assert batcher.step() and len(drain(long)) == 2 and len(drain(busy)) == 1  # read: its first two tokens


def test_prompts_that_arrive_together_are_read_in_shared_passes_and_answer_as_alone(model, monkeypatch):
    """Three requests submitted together (prompts of 5, 40 and 17 tokens, chunk 30): while another
    request decodes, their prompts are read in shared passes of 30 tokens from each row still reading
    (a shorter rest padded); with none decoding, in one pass. Each answer is the one it gets alone."""
    prompts = [prompt(i, n) for i, n in enumerate((5, 40, 17))]
    passes, hidden_states = [], model.hidden_states
    monkeypatch.setattr(model, "hidden_states", lambda idx, cache: passes.append(tuple(idx.shape)) or
                        hidden_states(idx, cache))
    for busy, expected in ((True, [(1, 3), (3, 30), (1, 10)]), (False, [(3, 40)])):
        passes.clear()
        batcher = batching.Batcher(model, slots=4, context=128, chunk=30)
        if busy:
            batcher.submit(prompt(9, 3), 40)
            batcher.step()
        requests = [batcher.submit(p, 6) for p in prompts]
        while batcher.step():
            pass
        assert passes == expected
        assert [drain(r) for r in requests] == [engine.generate(model, p, 6) for p in prompts]


def test_requests_left_in_high_slots_move_down_so_a_step_computes_only_rows_in_use(model, monkeypatch):
    """Four requests; the three in the lower slots end one after another: the last one's cache row moves
    down each time, so each decode step computes the rows in use only (one, at the end, not four).
    Every answer is the one it gets alone."""
    prompts, limits = [prompt(i, 4 + i) for i in range(4)], (2, 3, 4, 12)
    rows, decode_step = [], batching.decode_step
    monkeypatch.setattr(batching, "decode_step", lambda m, idx, positions, cache: rows.append(idx.size(0)) or
                        decode_step(m, idx, positions, cache))
    batcher = batching.Batcher(model, slots=4, context=64)
    requests = [batcher.submit(p, n) for p, n in zip(prompts, limits)]
    while batcher.step():
        pass
    assert rows == [4, 3, 2] + [1] * 8  # each answer's first token comes from its prompt
    assert [drain(r) for r in requests] == [engine.generate(model, p, n) for p, n in zip(prompts, limits)]


def test_a_decode_step_reads_enough_slots_for_a_row_further_along_its_prompt_than_any_decoding_row(model):
    """Rows reading a prompt take part in decode steps (a dummy token where their next goes): the
    slots a step reads must hold theirs too, not only the decoding rows'."""
    batcher = batching.Batcher(model, slots=2, context=128, chunk=32, cache_sizes=(16, 64))
    first, short = batcher.submit(prompt(1, 3), 1), batcher.submit(prompt(2, 3), 30)
    batcher.step()  # the first request's one token: slot 0 is free again
    batcher.step()
    long = batcher.submit(prompt(3, 100), 3)  # slot 0, below the decoding row: in every decode step
    while batcher.step():
        pass
    assert first.slot is None and long.slot is None and len(drain(long)) == 3
    assert drain(short) == engine.generate(model, prompt(2, 3), 30)


def test_a_request_whose_reader_leaves_frees_its_slot_at_the_next_step_for_the_next_in_line(model):
    batcher = batching.Batcher(model, slots=1, context=64)
    first, second = batcher.submit(prompt(1, 4), 40), batcher.submit(prompt(2, 4), 3)
    tokens = first.tokens()
    batcher.step()
    assert next(tokens) is not None and batcher.position(second) == 0 and second.slot is None
    tokens.close()  # the client went away
    batcher.step()
    assert second.slot == 0 and first.slot is None and len(drain(second)) == 2


def test_requests_stop_at_their_own_stop_tokens_limits_and_the_full_context(model):
    batcher = batching.Batcher(model, slots=3, context=20)
    plain = batcher.submit(prompt(1, 4), 6)
    sampled = engine.generate(model, prompt(2, 4), 6, temperature=1.0, generator=torch.Generator().manual_seed(0))
    j = next(i for i, t in enumerate(sampled) if i > 0 and t not in sampled[:i])  # a token new at j
    stopped = batcher.submit(prompt(2, 4), 6, temperature=1.0, seed=0, stop_ids={sampled[j]})
    full = batcher.submit(prompt(3, 15), 100)
    while batcher.step():
        pass
    assert len(drain(plain)) == 6 and drain(stopped) == sampled[:j + 1]
    assert len(drain(full)) == 20 - 15 + 1  # the last token sampled needs no slot of its own
    assert batcher.running == {} and batcher.cache.lengths.tolist() == [0, 0, 0]


def test_waiting_requests_know_their_place_in_the_queue(model):
    batcher = batching.Batcher(model, slots=1, context=64)
    requests = [batcher.submit(prompt(i, 3), 5) for i in range(3)]
    batcher.step()
    assert [batcher.position(r) for r in requests] == [0, 0, 1] and requests[0].slot == 0


def test_a_model_error_ends_the_batchs_requests_with_it_and_the_batcher_goes_on(model):
    batcher = batching.Batcher(model, slots=2, context=64)
    failing = batcher.submit(prompt(1, 4), 5)
    batcher.step()
    batcher.step_fn = lambda *args: (_ for _ in ()).throw(RuntimeError("out of memory"))
    batcher.step()
    with pytest.raises(RuntimeError, match="out of memory"):
        list(failing.tokens())
    batcher.step_fn = lambda idx, positions, cache: engine.decode_step(model, idx, positions, cache)
    later = batcher.submit(prompt(2, 4), 3)
    while batcher.step():
        pass
    assert len(drain(later)) == 3


def test_a_prompt_that_leaves_no_room_is_refused_and_the_kv_cache_size_is_stated(model):
    batcher = batching.Batcher(model, slots=8, context=64)
    for ids in ([], prompt(1, 64)):
        with pytest.raises(ValueError, match="1 to 63"):
            batcher.submit(ids, 5)
    config = model.config
    assert batching.kv_cache_bytes(config, 8, 64, torch.float32) == sum(
        t.numel() * 4 for t in batcher.cache.k + batcher.cache.v)


def test_padded_batch_sizes_keep_a_compiled_steps_shapes_few(model):
    batcher = batching.Batcher(model, slots=8, context=64, sizes=(1, 2, 4, 8))
    assert [batcher.rows(n) for n in range(1, 9)] == [1, 2, 4, 4, 8, 8, 8, 8]
    seen = []
    step = lambda idx, positions, cache: seen.append(idx.size(0)) or engine.decode_step(model, idx, positions, cache)
    batcher.step_fn = step
    requests = [batcher.submit(prompt(i, 3), 4) for i in range(3)]
    while batcher.step():
        pass
    assert set(seen) <= {1, 2, 4} and 4 in seen and all(len(drain(r)) == 4 for r in requests)


def test_a_lone_request_decodes_through_the_compiled_step_and_passes_read_only_the_slots_in_use(model):
    """set_compiled: a compiled one-row step for some cache sizes; a step of several rows, or of a
    size it was not built for, runs eagerly. Every pass reads the first cache size that holds its
    tokens, and each request counts the steps it took by path (the Space's status line says it)."""
    batcher = batching.Batcher(model, slots=2, context=128, cache_sizes=(16, 64))
    calls = []
    compiled = lambda idx, positions, cache: calls.append((idx.size(0), cache.size)) or engine.decode_step(
        model, idx, positions, cache)
    batcher.set_compiled(compiled, {16})
    eager = batcher.step_fn
    batcher.step_fn = lambda idx, positions, cache: calls.append(("eager", idx.size(0), cache.size)) or eager(
        idx, positions, cache)
    alone = batcher.submit(prompt(1, 5), 20)
    while batcher.step():
        pass
    assert drain(alone) == engine.generate(model, prompt(1, 5), 20)
    assert calls[:11] == [(1, 16)] * 11 and calls[11] == ("eager", 1, 64)  # 5 + 11 tokens fill 16 slots
    assert alone.paths == {"compiled": 11, "eager": 8}
    calls.clear()
    pair = [batcher.submit(prompt(2, 5), 3), batcher.submit(prompt(3, 5), 3)]
    while batcher.step():
        pass
    assert ("eager", 2, 16) in calls and all(len(drain(r)) == 3 for r in pair)


def test_a_request_nobody_reads_ends_at_the_time_limit(model):
    batcher = batching.Batcher(model, slots=1, context=64, time_limit=0.0)
    request = batcher.submit(prompt(1, 4), 50)
    batcher.step()
    assert request.closed and request.slot is None and batcher.running == {}
