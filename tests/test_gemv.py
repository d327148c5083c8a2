"""The C decode kernel (smollm2/gemv.py): F.linear's products for fp32 and bf16 weights, each row's
result the same whatever rows are beside it, used where a decode step of the model measured it faster
(cached per machine), and F.linear wherever it does not apply or cannot be built."""
import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_model
from smollm2 import batching, engine, gemv


@pytest.fixture(scope="module")
def lib():
    lib = gemv.build()
    assert lib is not None, gemv.LIBRARY["error"]  # CI has a C compiler: torch.compile needs one too
    return lib


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8])
def test_the_kernel_computes_f_linears_products(lib, dtype, rows):
    g = torch.Generator().manual_seed(rows)
    x, w = torch.randn(rows, 576, generator=g).to(dtype), torch.randn(1536, 576, generator=g).to(dtype)
    with torch.inference_mode():
        assert gemv.fits(x, w)
        got, expected = gemv.linear(x, w, lib), F.linear(x.float(), w.float())
    assert got.dtype == dtype and got.shape == (rows, 1536)
    # fp32 sums in another order; bf16: F.linear's fp32 sum rounded once, as here
    torch.testing.assert_close(got.float(), expected, rtol=1e-5 if dtype == torch.float32 else 8e-3,
                               atol=1e-4 if dtype == torch.float32 else 3e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_rows_result_does_not_depend_on_the_rows_beside_it(lib, dtype):
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(8, 96, generator=g).to(dtype), torch.randn(256, 96, generator=g).to(dtype)
    with torch.inference_mode():
        together = gemv.linear(x, w, lib)
        for n in range(8):
            assert torch.equal(gemv.linear(x[n:n + 1], w, lib)[0], together[n])
        assert torch.equal(gemv.linear(x[3:6], w, lib), together[3:6])


def test_what_the_kernel_does_not_take_goes_to_f_linear():
    x, w = torch.randn(2, 96), torch.randn(256, 96)
    with torch.inference_mode():
        assert gemv.fits(x, w)
        assert not gemv.fits(torch.randn(9, 96), w)  # more rows than MAX_ROWS: a prompt's pass
        assert not gemv.fits(x, torch.randn(254, 96)) and not gemv.fits(torch.randn(2, 100), torch.randn(256, 100))
        assert not gemv.fits(x, w.t().contiguous().t()) and not gemv.fits(x.half(), w.half())
        assert not gemv.fits(x.bfloat16(), w)
    assert not gemv.fits(x, w.requires_grad_())  # training: autograd needs F.linear


def test_no_compiler_means_f_linear_and_a_line_that_says_why(monkeypatch, tmp_path):
    monkeypatch.setattr(gemv, "LIBRARY", {})
    assert gemv.build(cc=str(tmp_path / "no-such-cc"), cache_dir=str(tmp_path)) is None
    assert gemv.LIBRARY["error"]
    model = tiny_model().eval()
    line = engine.install_gemv(model, path=str(tmp_path / "paths.json"))
    assert "F.linear" in line and "could not be built" in line
    assert not any(isinstance(m, engine.StreamingLinear) for m in model.modules())


def test_a_kernel_that_fails_in_a_decode_step_leaves_f_linear_and_says_so(lib, monkeypatch, tmp_path):
    model = tiny_model().eval()
    monkeypatch.setattr(gemv, "linear", lambda x, w: (_ for _ in ()).throw(RuntimeError("bad kernel")))
    line = engine.install_gemv(model, path=str(tmp_path / "paths.json"))
    assert "F.linear" in line and "RuntimeError: bad kernel" in line
    assert all(m.kernel_rows == frozenset() for m in model.modules() if isinstance(m, engine.StreamingLinear))
    assert len(engine.generate(model, [1, 2, 3], 4)) == 4


def test_the_kernel_serves_the_batch_sizes_where_the_model_measured_it_faster(tmp_path):
    """A fake clock: each step advances it by its size's seconds, the kernel 2x faster at 1 row, 3x
    slower at 2, and 1.02x faster at 4 (within the margin: F.linear). Cached per key."""
    seconds = {(1, False): 2.0, (1, True): 1.0, (2, False): 1.0, (2, True): 3.0, (4, False): 1.02, (4, True): 1.0}
    now, calls = [0.0], []

    def step(n, kernel):
        calls.append((n, kernel))
        now[0] += seconds[n, kernel]
    path = str(tmp_path / "paths.json")
    figures, rows = gemv.choose(step, "machine A", sizes=(1, 2, 4), reps=3, path=path, clock=lambda: now[0])
    expected = {"1": [2.0, 1.0], "2": [1.0, 3.0], "4": [1.02, 1.0]}
    assert rows == {1} and figures == {n: pytest.approx(f) for n, f in expected.items()}
    assert calls[:8] == [(1, False), (1, True)] * 4 and len(calls) == 3 * 8  # in turns, set-up first
    figures, rows = gemv.choose(lambda n, k: pytest.fail("measured again"), "machine A", sizes=(1, 2, 4), path=path)
    assert rows == {1}  # cached for this machine and model
    gemv.choose(step, "machine B", sizes=(1, 2, 4), reps=3, path=path, clock=lambda: now[0])
    assert len(calls) == 2 * 3 * 8  # another key: measured


def test_batched_steps_through_the_kernel_give_each_requests_tokens_alone(lib, tmp_path):
    """The kernel at every batch size: greedy and sampled answers of requests decoded together are,
    token for token, those each gets decoding alone through it (a row does not see its neighbours)."""
    model = tiny_model().eval()
    line = engine.install_gemv(model, path=str(tmp_path / "paths.json"))
    assert line.startswith("decode products:")
    engine.kernel_at(model, range(1, gemv.MAX_ROWS + 1))
    prompts = [torch.randint(0, 500, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (3, 9, 30, 5)]
    settings = dict(temperature=0.8, top_k=40, seed=3)
    together = batching.generate_batch(model, prompts, 12, **settings)
    alone = [batching.generate_batch(model, [p], 12, **settings)[0] for p in prompts]
    assert together == alone and len({tuple(t) for t in together}) == 4
