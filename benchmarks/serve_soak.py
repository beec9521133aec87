"""200 sequential chat requests to `sparserun serve` on a loopback port: every one answered, the server's resident
memory at start, after the first request that fills the context, and at the end.

    python benchmarks/serve_soak.py models/storyteller.gguf --requests 200 --ctx 512

The client keeps one conversation and, like a chat front-end, sends it whole each time, dropping its oldest turns
when the server answers that the prompt no longer fits (HTTP 400, context_length_exceeded); the server computes only
what its cache lacks (its /health counts the prompt tokens computed).
"""
import argparse
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import psutil


def post(base, body):
    req = urllib.request.Request(base + "/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("-n", type=int, default=64, help="max_tokens of each request")
    a = ap.parse_args(argv)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    p = subprocess.Popen([sys.executable, "-m", "sparserun.cli", "serve", a.model, "--port", str(port), "--ctx",
                          str(a.ctx)], stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            urllib.request.urlopen(base + "/health", timeout=2).read()
            break
        except OSError:
            time.sleep(0.5)
    proc = psutil.Process(p.pid)
    rss = [proc.memory_info().rss / 2**20]
    msgs, answered, trims, generated, first_full = [], 0, 0, 0, None
    t0 = time.time()
    for i in range(a.requests):
        msgs.append({"role": "user", "content": f"Tell me a story about a {['red kite', 'brave cat', 'green boat'][i % 3]}."})
        while True:
            status, r = post(base, {"messages": msgs, "max_tokens": a.n, "temperature": 0.8, "seed": i})
            if status == 400 and r["error"].get("code") == "context_length_exceeded" and len(msgs) > 1:
                del msgs[:max(2, len(msgs) // 2 // 2 * 2)]  # the oldest half of the turns
                trims += 1
                first_full = i if first_full is None else first_full
                continue
            break
        if status != 200:
            print(f"request {i}: {status} {r}")
            break
        answered += 1
        generated += r["usage"]["completion_tokens"]
        msgs.append({"role": "assistant", "content": r["choices"][0]["message"]["content"]})
        rss.append(proc.memory_info().rss / 2**20)
    health = json.loads(urllib.request.urlopen(base + "/health", timeout=10).read())
    p.terminate()
    p.wait(timeout=30)
    k = (first_full or 0) + 1
    print(f"{answered} of {a.requests} requests answered in {time.time() - t0:.0f} s; {generated} tokens generated; "
          f"{trims} client trims; prompt tokens computed {health['prompt_tokens_processed']}")
    print(f"server RSS MiB: start {rss[0]:.0f}, after the first full context (request {k}) {rss[min(k, len(rss) - 1)]:.0f}, "
          f"max {max(rss):.0f}, end {rss[-1]:.0f}")
    return 0 if answered == a.requests else 1


if __name__ == "__main__":
    sys.exit(main())
