"""Sample text from any SmolLM2 weights on the command line, streamed as it is generated, with the
Space's settings (nanoGPT's sample.py for this repo).

    python sample.py runs/tiny/checkpoint.pt --prompt "ROMEO:"
    python sample.py runs/tiny/best.pt --prompt "ROMEO:" --num-samples 3 --temperature 1.0 --seed 7
    python sample.py SmolLM2-135M-Instruct.Q4_1.gguf --prompt "What is the capital of France?" --temperature 0

SOURCE is anything SmolLM2.from_pretrained reads: a checkpoint, best.pt, an HF directory, a .gguf or
.safetensors file, a hub id. The settings and their defaults are the Space's (hf_files/app.py): the
repetition penalty, then temperature (0 is greedy), top-k and top-p, drawn from --seed. A sample is
the prompt and its continuation, which stops at the model's EOS or after --max-new-tokens. An
Instruct model (its EOS is <|im_end|>), weights trained on conversations (their checkpoint or
training_info.json says so), or any model with --chat, gets the prompt as the user's turn of its
chat template, as the Space does, and the sample is the answer alone.
"""
import argparse
import os
import sys

import torch

from model import SmolLM2
from smollm2 import batching, engine
from smollm2.cli import NONNEG_FLOAT, NONNEG_INT, POS_FLOAT, POS_INT, OneLineParser, main_guard
from smollm2.devices import available_devices, pick_device
from smollm2.errors import ModelLoadError, UsageError
from smollm2.sampling import CHAT_END, TextStream, chat_wrap, is_chat_model
from smollm2.tokenizer import load_tokenizer

SEPARATOR = "---------------"  # between samples, as nanoGPT prints them


def probability(text):
    """An argparse type: a float in (0, 1]."""
    value = float(text)
    if not 0 < value <= 1:  # NaN fails too
        raise argparse.ArgumentTypeError(f"must be > 0 and <= 1, got {text}")
    return value


def build_parser():
    intro, examples = __doc__.split("\n\n")[:2]
    p = OneLineParser(description=intro, epilog="examples:\n" + examples,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="checkpoint, best.pt, HF directory, .gguf, .safetensors or hub id")
    p.add_argument("--prompt", required=True, action="append", help="the text to continue; an Instruct "
                   "model's question. Repeat it for several prompts: generated together (continuous "
                   "batching), each answer printed when all are done")
    p.add_argument("--max-new-tokens", type=POS_INT, default=128,
                   help="tokens generated per sample at most (default %(default)s)")
    p.add_argument("--temperature", type=NONNEG_FLOAT, default=0.7,
                   help="0 = greedy, always the most likely token (default %(default)s)")
    p.add_argument("--top-k", type=NONNEG_INT, default=50,
                   help="draw from the k most likely tokens only; 0 = all (default %(default)s)")
    p.add_argument("--top-p", type=probability, default=0.95,
                   help="draw from the most likely tokens that make up this probability; 1 = all "
                   "(default %(default)s)")
    p.add_argument("--repetition-penalty", type=POS_FLOAT, default=1.1,
                   help="scores of tokens already in the text shrink by this factor, as in transformers; "
                   "1 = off (default %(default)s)")
    p.add_argument("--seed", type=NONNEG_INT, default=0, help="the draws' seed (default %(default)s)")
    p.add_argument("--num-samples", type=POS_INT, default=1, help="samples drawn one after the other "
                   "(default %(default)s)")
    p.add_argument("--device", default="auto",
                   help="cpu, cuda, cuda:N or mps (default %(default)s: cuda, then mps, then cpu)")
    p.add_argument("--compile", action="store_true", help="decode through torch.compile: several "
                   "times faster on CPU after a one-off compilation")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template even if the "
                   "model is not an Instruct one")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    if not all(args.prompt):
        raise UsageError("--prompt is empty: give some text for the model to continue")
    if len(args.prompt) > 1 and args.num_samples > 1:
        raise UsageError("--num-samples draws several samples of one --prompt; with several prompts give one each")
    if args.seed >= 2**64:
        raise UsageError(f"--seed: must be below 2**64, got {args.seed}")
    device = pick_device(args.device, available_devices())
    model = SmolLM2.from_pretrained(args.source, device=device).eval()
    tokenizer = load_tokenizer()
    chat = (args.chat or is_chat_model(tokenizer, model.config.eos_token_id)
            or bool(model.source_info.get("conversations")))
    prefix, suffix = chat_wrap(tokenizer) if chat else ([], [])
    prompts = [prefix + tokenizer.encode(prompt).ids + suffix for prompt in args.prompt]
    if max(max(ids) for ids in prompts) >= model.config.vocab_size:
        raise ModelLoadError(f"{args.source}: its vocabulary has {model.config.vocab_size} tokens, the "
                             f"tokenizer {tokenizer.get_vocab_size()}: it was not trained with tokenizer/")
    try:
        if len(prompts) > 1:
            write_batch(model, tokenizer, prompts, chat, args, sys.stdout)
        else:
            write_samples(model, tokenizer, prompts[0], chat, args, sys.stdout)
    except BrokenPipeError:  # the reader (head, a pager) has had enough: not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nor at exit's final flush
    return 0


def write_samples(model, tokenizer, ids, chat, args, out):
    """args.num_samples samples of the prompt ids, each written to out token by token: the prompt
    (not in a chat) and its continuation, up to the model's EOS (or <|im_end|> in a chat)."""
    eos = model.config.eos_token_id
    stops = {eos, tokenizer.token_to_id(CHAT_END)} if chat else {eos}
    # one stream of draws for every sample, on the model's device as torch.multinomial needs
    generator = torch.Generator(model.lm_head.weight.device).manual_seed(args.seed)
    for n in range(args.num_samples):
        out.write(f"{SEPARATOR}\n" * (n > 0) + ("" if chat else args.prompt[0]))
        stream = TextStream(tokenizer)
        tokens = engine.generate_stream(model, ids, args.max_new_tokens, args.temperature, args.top_k or None,
                                        args.top_p, args.repetition_penalty, eos, generator, args.compile)
        for token in tokens:
            if token in stops:
                break
            out.write(stream.push(token))
            out.flush()
        tokens.close()
        out.write(stream.flush() + "\n")
        out.flush()


def write_batch(model, tokenizer, prompts, chat, args, out):
    """One answer to each prompt, generated together (smollm2/batching.py), each drawn with --seed as
    it would be alone, written one after another once all are done."""
    eos = model.config.eos_token_id
    stops = {eos, tokenizer.token_to_id(CHAT_END)} if chat else {eos}
    kernel = engine.install_gemv(model)  # batched steps through the C decode kernel where it measured faster
    if kernel:
        print(f"sample.py: {kernel}", file=sys.stderr)
    answers = batching.generate_batch(model, prompts, args.max_new_tokens, temperature=args.temperature,
                                      top_k=args.top_k or None, top_p=args.top_p,
                                      repetition_penalty=args.repetition_penalty, seed=args.seed, stop_ids=stops)
    for n, (prompt, tokens) in enumerate(zip(args.prompt, answers)):
        text = tokenizer.decode([t for t in tokens if t not in stops])
        out.write(f"{SEPARATOR}\n" * (n > 0) + ("" if chat else prompt) + text + "\n")
    out.flush()


if __name__ == "__main__":
    main_guard(main, "sample.py", interrupted="interrupted")
