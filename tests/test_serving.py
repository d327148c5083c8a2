"""The Space's serving (smollm2/serving.py): one Batcher thread for every request, the cache sizes,
the compiled decoder's build that yields to requests, and the CPUs a container grants. The app that
uses them is tested in test_app.py, the batching itself in test_batching.py."""
import os
import threading
import time

import torch

from smollm2.serving import Warmup, cache_sizes, cpu_budget


def test_the_batcher_decodes_every_request_on_its_own_thread_with_all_the_cores():
    """One thread with the cores runs every torch op of decoding (see the module's docstring); the
    requests that come while one decodes join its steps."""
    from conftest import tiny_model
    from smollm2 import engine
    from smollm2.batching import Batcher
    model = tiny_model().eval()
    batcher, seen = Batcher(model, slots=4, context=64), []
    eager = batcher.step_fn
    batcher.step_fn = lambda idx, positions, cache: seen.append(
        (threading.current_thread().name, torch.get_num_threads(), idx.size(0))) or eager(idx, positions, cache)
    batcher.start(threads=2)
    requests = [batcher.submit([i + 1, i + 2, i + 3], 30) for i in range(3)]
    answers = [[t for t in r.tokens() if t is not None] for r in requests]
    assert answers == [engine.generate(model, [i + 1, i + 2, i + 3], 30) for i in range(3)]
    assert {(name, threads) for name, threads, _ in seen} == {("batcher", 2)}
    assert max(rows for _, _, rows in seen) == 3  # the three shared decode steps


def test_cache_sizes_follow_the_context():
    assert cache_sizes(2048) == (256, 512, 1024, 2048)
    assert cache_sizes(1024) == (256, 512, 1024)
    assert cache_sizes(300) == (256, 300)


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
