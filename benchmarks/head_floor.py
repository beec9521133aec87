"""How fast decode could get with a free output head: the floor under `--head hot`'s speed-up.

Times greedy decode of one model with the dense head, with `--head hot[:K]`, and with a head that costs nothing
(returns zeros: the rest of the forward alone), interleaved repetitions, medians. The ratio dense / free-head is
the most any head can gain; the hot head's ratio is measured against it.

    python benchmarks/head_floor.py MODEL.gguf [--head hot] [-n 32] [-r 7] [--threads 2]
"""
import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import sparserun  # noqa: E402


class FreeHead:
    def __init__(self, n_vocab):
        self.n_vocab = n_vocab

    def __call__(self, acts, prior=(), ids=()):
        return np.zeros((acts.x.shape[0], self.n_vocab), np.float32)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("--head", default="hot")
    ap.add_argument("-n", type=int, default=32)
    ap.add_argument("-r", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    m = sparserun.load(a.model, threads=a.threads, n_ctx=a.n + 8)
    heads = {"dense": None, a.head: m.set_head(a.head), "free head": FreeHead(m.n_vocab)}
    bos = max(m.tokenizer.bos_id, 0)
    rates = {k: [] for k in heads}
    feed = [int(t) for t in np.random.default_rng(0).integers(3, m.n_vocab, a.n)]  # the same tokens for every head
    for rep in range(a.r + 1):
        for name, head in heads.items():
            m.use_head(head)
            m.reset()
            ctx = [bos]
            t = time.perf_counter()
            for i in range(a.n):
                m.eval(ctx)
                ctx.append(feed[i])
            if rep:  # the first round compiles and pages in
                rates[name].append(a.n / (time.perf_counter() - t))
    dense = statistics.median(rates["dense"])
    print("| head | t/s | vs dense |\n|---|---|---|")
    for name, r in rates.items():
        print(f"| {name} | {statistics.median(r):.2f} ± {statistics.stdev(r):.2f} | {statistics.median(r) / dense:.2f}x |")


if __name__ == "__main__":
    main()
