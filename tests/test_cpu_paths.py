"""The fp32 CPU product library chosen by measuring it (smollm2/cpu_paths.py), not by vendor: the
choice on three CPUs' measured figures and on a fake slower library either way, the per-machine cache,
the checkpoint's record, and what a resume on the same or another machine does."""
import json

import pytest
import torch

from conftest import TINY, load_ckpt, run_train
from model import PRESETS
from smollm2 import cpu_paths, devices

GFLOPS = 1e9
# fp32 matmul rates (GFLOP/s) measured on 2 cores, MKL and oneDNN: issue 42 (Zen 3) and docs/performance.md
CPUS = {"AMD EPYC Zen 3 (AVX2 only)": (184, 140, "mkl"),  # the CPU the vendor rule sent to oneDNN
        "AMD EPYC Zen 4 (AVX-512)": (195, 445, "onednn"),
        "Intel Xeon with AMX": (446, 413, "mkl")}


@pytest.mark.parametrize("cpu", CPUS)
def test_the_library_follows_each_cpus_measured_rates_not_its_vendor(cpu):
    mkl, onednn, chosen = CPUS[cpu]
    assert cpu_paths.pick({"mkl": mkl * GFLOPS, "onednn": onednn * GFLOPS}) == chosen


def test_onednn_must_beat_mkl_by_the_margin_and_a_fake_slower_library_either_way_loses():
    assert cpu_paths.pick({"mkl": 100.0, "onednn": 109.0}) == "mkl"  # within the noise: torch's own path
    assert cpu_paths.pick({"mkl": 100.0, "onednn": 111.0}) == "onednn"
    assert cpu_paths.pick({"mkl": 1.0, "onednn": 1e6}) == "onednn" and cpu_paths.pick({"mkl": 1e6, "onednn": 1.0}) == "mkl"


def test_the_measurement_times_both_libraries_on_the_models_layers_forward_and_backward():
    config = PRESETS["tiny"]
    assert cpu_paths.weight_shapes(config) == [(32, 96), (96, 96), (96, 256), (256, 96)]  # k/v, q/o, down, gate/up
    if cpu_paths.onednn_available():
        figures = cpu_paths.measure(config, 64)
        assert set(figures) == {"mkl", "onednn"} and all(v > 0 for v in figures.values())


def test_a_cpu_held_to_avx2_by_torchs_onednns_or_mkls_variables_is_another_machine():
    info = ("Some CPU", "GenuineIntel", {"avx2", "avx512f", "amx_bf16"})
    plain = cpu_paths.machine_key(info, environ={})
    held = cpu_paths.machine_key(info, environ={"ATEN_CPU_CAPABILITY": "avx2", "DNNL_MAX_CPU_ISA": "AVX2"})
    assert held != plain and "ATEN_CPU_CAPABILITY=avx2" in held and "DNNL_MAX_CPU_ISA=AVX2" in held
    assert cpu_paths.machine_key(info, environ={"UNRELATED": "1"}) == plain


def test_a_measurement_is_cached_per_machine_and_model_shape(tmp_path):
    path, calls = str(tmp_path / "cache" / "cpu_paths.json"), []
    fake = lambda config, rows: calls.append(rows) or {"mkl": 1.0, "onednn": 2.0}  # noqa: E731
    first = cpu_paths.choose(PRESETS["tiny"], 64, path=path, measure_fn=fake, key="cpu A")
    again = cpu_paths.choose(PRESETS["tiny"], 64, path=path, measure_fn=fake, key="cpu A")
    assert (first["route"], first["source"], again["source"], calls) == ("onednn", "measured", "cache", [64])
    cpu_paths.choose(PRESETS["tiny"], 128, path=path, measure_fn=fake, key="cpu A")  # other shapes (rows up to 512)
    cpu_paths.choose(PRESETS["tiny"], 64, path=path, measure_fn=fake, key="cpu B")  # another machine
    assert calls == [64, 128, 64] and len(json.loads(open(path).read())) == 3
    unwritable = tmp_path / "file"
    unwritable.write_text("")
    assert cpu_paths.choose(PRESETS["tiny"], 64, path=str(unwritable / "x.json"), measure_fn=fake)["route"] == "onednn"


def test_a_resume_on_its_machine_keeps_the_path_and_elsewhere_measures_again_and_says_so(tmp_path):
    path = str(tmp_path / "cpu_paths.json")
    slower_onednn = lambda config, rows: {"mkl": 2.0, "onednn": 1.0}  # noqa: E731
    saved = {"machine": "cpu A", "route": "onednn", "figures": {"mkl": 1.0, "onednn": 2.0}}
    same = cpu_paths.choose(PRESETS["tiny"], 64, saved, path=path, measure_fn=slower_onednn, key="cpu A")
    assert same["route"] == "onednn" and same["source"] == "checkpoint" and same["note"] is None
    other = cpu_paths.choose(PRESETS["tiny"], 64, saved, path=path, measure_fn=slower_onednn, key="cpu B")
    assert other["route"] == "mkl" and other["source"] == "measured"
    assert "resumed on another machine (cpu B; the run began on cpu A)" in other["note"] and "onednn before" in other["note"]
    assert "resumed on another machine" in cpu_paths.describe(other)
    assert cpu_paths.record(other) == {"machine": "cpu B", "route": "mkl", "figures": {"mkl": 2.0, "onednn": 1.0}}


@pytest.mark.skipif(not cpu_paths.onednn_available(), reason="the choice is made on x86 CPUs with oneDNN only")
def test_train_py_logs_the_choice_keeps_it_in_the_checkpoint_and_a_resume_elsewhere_says_it_changed(tmp_path, corpus):
    args = [*TINY, "--data", corpus, "--steps", 2]
    proc = run_train(tmp_path, *args, "--save", "a/c.pt")
    assert "fp32 products: " in proc.stdout and "GFLOP/s" in proc.stdout
    ckpt = load_ckpt(tmp_path / "a/c.pt")
    assert ckpt["cpu_paths"]["machine"] == cpu_paths.machine_key() and ckpt["cpu_paths"]["route"] in ("mkl", "onednn")
    resumed = run_train(tmp_path, *TINY, "--data", corpus, "--steps", 3, "--ckpt", "a/c.pt", "--save", "b/c.pt")
    assert "as the checkpoint's run on this machine" in resumed.stdout
    ckpt["cpu_paths"]["machine"] = "another CPU | flags 0 | torch 0"
    torch.save(ckpt, tmp_path / "a/moved.pt")
    moved = run_train(tmp_path, *TINY, "--data", corpus, "--steps", 3, "--ckpt", "a/moved.pt", "--save", "c/c.pt")
    assert "resumed on another machine" in moved.stdout and "the run began on another CPU" in moved.stdout
    assert devices.cpu_info()[0] in moved.stdout
