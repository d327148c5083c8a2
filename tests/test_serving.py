"""The Space's CPU serving (smollm2/serving.py): one decoder thread for every request, the cache sizes,
the compiled decoder's build that yields to requests, and the CPUs a container grants. The app that
uses them is tested in test_app.py."""
import os
import threading
import time

import pytest
import torch

from smollm2.serving import Decoder, Warmup, cache_size, cache_sizes, cpu_budget


def test_decoder_runs_every_request_on_one_thread_with_all_the_cores_in_turns():
    decoder, seen = Decoder(2, 60), []

    def tokens(name, n):  # what the decoder thread sees while it computes each "token"
        for i in range(n):
            seen.append(name)
            time.sleep(0.005)  # a token's work: the second request arrives while the first runs
            yield name, i, threading.current_thread().name, torch.get_num_threads()

    assert list(decoder.stream(tokens("alone", 3))) == [("alone", i, "decoder", 2) for i in range(3)]
    a, b = decoder.stream(tokens("a", 40)), decoder.stream(tokens("b", 40))
    first_a, first_b = next(a), next(b)  # both in the decoder's hands now, a with 39 tokens to go
    rest_a, rest_b = list(a), list(b)
    assert [first_a] + rest_a == [("a", i, "decoder", 2) for i in range(40)]
    assert [first_b] + rest_b == [("b", i, "decoder", 2) for i in range(40)]
    both = seen[seen.index("b"):]
    assert both[:20].count("a") >= 8 and both[:20].count("b") >= 8  # in turns, not one after the other


def test_decoder_passes_errors_on_and_closing_ends_the_job_on_its_thread():
    decoder, ended = Decoder(1, 60), threading.Event()

    def broken():
        yield 1
        raise ValueError("the model failed")

    stream = decoder.stream(broken())
    assert next(stream) == 1
    with pytest.raises(ValueError, match="the model failed"):
        next(stream)

    def endless():
        try:
            while True:
                yield 0
        finally:
            ended.set()

    stream = decoder.stream(endless())
    next(stream)
    stream.close()  # what Stop does to the request's generator
    assert ended.wait(10), "the decoder kept computing a closed request"
    assert list(decoder.stream(c for c in "ok")) == ["o", "k"]  # and serves the next one

    ended.clear()
    decoder = Decoder(1, time_limit=0.2)  # a stream nobody closes ends at the time limit
    started = time.monotonic()
    assert len(list(decoder.stream(endless()))) > 0 and ended.wait(10)
    assert 0.2 <= time.monotonic() - started < 10


def test_cache_sizes_follow_the_context():
    assert cache_sizes(2048) == (256, 512, 1024, 2048)
    assert cache_sizes(1024) == (256, 512, 1024)
    assert cache_sizes(300) == (256, 300)
    assert [cache_size(n, 2048) for n in (1, 256, 257, 1500, 2048, 5000)] == [256, 256, 512, 2048, 2048, 2048]


def test_warmup_build_pauses_while_a_request_runs_and_the_page_says_how_far_it_is():
    warmup = Warmup(None, 2048, enabled=False, threads=1, request_limit=60)
    with warmup.request():
        assert not warmup.idle.is_set()
        waiter = threading.Thread(target=warmup.yield_to_requests)  # the build thread's hook
        waiter.start()
        waiter.join(0.3)
        assert waiter.is_alive()  # the build waits while the request runs
    waiter.join(5)
    assert not waiter.is_alive() and warmup.idle.is_set() and warmup.paused_s > 0.2
    warmup.deadline = 0.0  # a request that outlived the time limit (never closed) stops holding it
    warmup.idle.clear()
    started = time.monotonic()
    warmup.yield_to_requests()
    assert time.monotonic() - started < 1
    warmup.enabled, warmup.ready = True, [256, 512]
    warmup.done.clear()
    assert "2 of 4 cache sizes" in warmup.markdown() and "built: 256, 512" in warmup.markdown()


def test_cpu_budget_is_the_affinity_cut_to_a_containers_cgroup_quota(tmp_path):
    cores = len(os.sched_getaffinity(0))
    quota = tmp_path / "cpu.max"
    assert cpu_budget(str(tmp_path / "none")) == cores  # no cgroup v2 file: the affinity
    quota.write_text("max 100000\n")
    assert cpu_budget(str(quota)) == cores  # no quota
    quota.write_text("100000 100000\n")
    assert cpu_budget(str(quota)) == 1  # one CPU's worth of time
    quota.write_text("50000 100000\n")
    assert cpu_budget(str(quota)) == 1  # never below one
    quota.write_text(f"{100000 * (cores + 3)} 100000\n")
    assert cpu_budget(str(quota)) == cores  # a quota above the affinity grants no more
    quota.write_text("garbage\n")
    assert cpu_budget(str(quota)) == cores
