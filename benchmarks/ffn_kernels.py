"""FFN cost against the kept fraction of neurons, for one decode token, all layers.

    python benchmarks/ffn_kernels.py /tmp/tl-Q4_0.gguf [--fractions 1,0.5,0.25,0.1,0.05] [-r 7]

Each sparse row computes a fixed random neuron set per layer the way a predictor policy does (one pass
of the pack kernel over the neurons' gate, up and down; see sparserun/ffn_pack.py); the dense row is the dense FFN (gate and up
matmuls, activation, down matmul). Repetitions are interleaved across rows; medians are reported.
Target (issue 3): at fraction f the FFN costs at most f + 0.05 of the dense FFN.
"""
import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import sparserun  # noqa: E402
from sparserun.sparse_ffn import SparseFFN  # noqa: E402
from sparserun.sparsity import SparsityPolicy  # noqa: E402
from sparserun.weights import Acts  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--fractions", default="1,0.5,0.25,0.1,0.05")
    ap.add_argument("-r", "--repetitions", type=int, default=7)
    ap.add_argument("-t", "--threads", type=int, default=None)
    a = ap.parse_args(argv)
    fractions = [float(x) for x in a.fractions.split(",")]
    m = sparserun.load(a.model, threads=a.threads, n_ctx=8)
    import numba

    numba.set_num_threads(m.threads)
    n_ff, n_layer = m.args.n_ff, m.args.n_layer
    rng = np.random.default_rng(0)
    ffns = {}
    for f in fractions:
        sets = [np.sort(rng.choice(n_ff, max(1, int(round(f * n_ff))), replace=False)) for _ in range(n_layer)]
        ffns[f] = SparseFFN(m, SparsityPolicy(), predictor=lambda li, x, sets=sets: [sets[li]])
    x = Acts(rng.standard_normal((1, m.args.dim)).astype(np.float32))

    def run(ffn):
        m.sparse = ffn
        t = time.perf_counter()
        for li in range(n_layer):
            m.ffn(li, Acts(x.x))
        return time.perf_counter() - t

    rows = {"dense": None, **{f: ffns[f] for f in fractions}}
    times = {k: [] for k in rows}
    for r in range(a.repetitions + 1):
        for k, ffn in rows.items():
            dt = run(ffn)
            if r:  # the first pass compiles and pages in
                times[k].append(dt)
    dense = statistics.median(times["dense"])
    print(f"FFN of {n_layer} layers, one token, {m.threads} threads, {os.path.basename(a.model)}; medians of {a.repetitions}")
    print("| kept fraction | ms/token | vs dense | target (f + 0.05) |")
    print("|---|---|---|---|")
    print(f"| dense | {dense * 1e3:.2f} | 1.00 | |")
    for f in fractions:
        t = statistics.median(times[f])
        ok = "met" if t / dense <= f + 0.05 else "missed"
        print(f"| {f:g} | {t * 1e3:.2f} | {t / dense:.3f} | {f + 0.05:.2f} {ok} |")


if __name__ == "__main__":
    main()
