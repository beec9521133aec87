"""A long piped chat: N requests through `sparserun chat` in one process, past many full contexts.

    python benchmarks/long_chat.py models/storyteller.gguf --turns 90 --ctx 512 -n 128

Reports the tokens the user typed, generated and the prompt tokens the engine computed (from each turn's timing
line), how often the context was trimmed, and the process's resident memory at start, after the first full context
and at the end. With the context shift (chat drops the oldest half of its turns and shifts the KV cache), the
prompt tokens computed stay near what was typed; recomputing the remaining context at every full turn cost 119,849
prompt tokens for 6,486 generated over 90 requests.
"""
import argparse
import re
import subprocess
import sys
import threading
import time

import psutil

REQUESTS = ["Tell me a story about a {} {}.", "Tell me a story about {} {}.", "Can you tell a story about a {} {}?"]
THINGS = [("red", "kite"), ("little", "dog"), ("brave", "cat"), ("green", "boat"), ("big", "bear"), ("blue", "ball"),
          ("small", "bird"), ("happy", "frog"), ("old", "tree"), ("yellow", "car")]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--turns", type=int, default=90)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("-n", type=int, default=128, help="longest answer")
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args(argv)
    msgs = [REQUESTS[i % 3].format(*THINGS[(i * 7) % len(THINGS)]) for i in range(a.turns)]
    p = subprocess.Popen([sys.executable, "-m", "sparserun.cli", "chat", a.model, "--ctx", str(a.ctx), "-n", str(a.n),
                          "--seed", str(a.seed)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    proc = psutil.Process(p.pid)
    turns, trims, rss = [], 0, []  # per turn (prompt tokens computed, generated, RSS MiB when its line came)
    t0 = time.time()
    first_trim = None

    def feed():
        p.stdin.write("\n".join(msgs) + "\n")
        p.stdin.close()

    threading.Thread(target=feed, daemon=True).start()
    out = []
    threading.Thread(target=lambda: out.append(p.stdout.read()), daemon=True).start()
    for line in p.stderr:
        if line.startswith("[context full") and first_trim is None:
            first_trim = len(turns)
        trims += line.startswith("[context full")
        m = re.search(r"prompt: (\d+) tokens.*generation: (\d+) tokens", line)
        if m:
            turns.append((int(m.group(1)), int(m.group(2))))
            try:
                rss.append(proc.memory_info().rss / 2**20)
            except psutil.Error:
                pass
    p.wait(timeout=7200)
    prompt, gen = sum(x for x, _ in turns), sum(y for _, y in turns)
    import sparserun

    tok = sparserun.load(a.model).tokenizer
    typed = sum(len(tok.encode(m, add_bos=False)) for m in msgs)
    print(f"exit {p.returncode}; {len(turns)} of {len(msgs)} turns answered; {trims} context trims; "
          f"{time.time() - t0:.0f} s")
    print(f"typed {typed} tokens, generated {gen}, prompt tokens computed {prompt} "
          f"= {prompt / max(1, typed + gen):.2f}x (typed + generated)")
    if rss:
        k = first_trim if first_trim is not None and first_trim < len(rss) else 0
        print(f"RSS MiB: after turn 1 {rss[0]:.0f}, after the first full context (turn {k + 1}) {rss[k]:.0f}, "
              f"max {max(rss):.0f}, end {rss[-1]:.0f}")
    print("last answer:", out[0].strip().splitlines()[-1][:200] if out and out[0].strip() else "")
    return 0 if p.returncode == 0 and len(turns) == len(msgs) else 1


if __name__ == "__main__":
    sys.exit(main())
