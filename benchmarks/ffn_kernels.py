"""FFN cost against the kept fraction of neurons, for one decode token, all layers.

    python benchmarks/ffn_kernels.py /tmp/tl-Q4_0.gguf [--fractions 1,0.5,0.25,0.1,0.05] [-r 7]

Each sparse row computes a fixed random neuron set per layer the way a predictor policy does (one pass
of the pack kernel over the neurons' gate, up and down; see sparserun/ffn_pack.py); the dense row is the dense FFN (gate and up
matmuls, activation, down matmul). Repetitions are interleaved across rows; medians are reported.
Target: at fraction f the FFN costs at most f + 0.05 of the dense FFN.

The "read floor" column is the time to only read the same units' bytes, split over the threads the same way
and prefetched line by line READ_AHEAD units ahead, with no arithmetic (benchmarks/unit_reads.py: a whole unit
prefetched at once measured 24-27 against 28-33 GB/s at f = 0.5 on 2 threads in one state of the machine,
alike in others): the memory cost of the layout at that fraction, in the same run, and the rate (GB/s) those
bytes came at; "dense rate" is the dense FFN's bytes over its time. Where the floor is above f + 0.05,
reading the kept neurons' bytes alone misses the target: random 3.5 KB units stream more slowly than the
dense matrices.
"""
import argparse
import os
import statistics
import sys
import time

import numba
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import sparserun  # noqa: E402
from benchmarks.unit_reads import SPREAD, read_units  # noqa: E402
from sparserun.sparse_ffn import SparseFFN  # noqa: E402
from sparserun.sparsity import Policy  # noqa: E402
from sparserun.weights import Acts  # noqa: E402


READ_AHEAD = 8  # units the read floor prefetches ahead, line by line as the pack kernel does (SPREAD)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model")
    ap.add_argument("--fractions", default="1,0.5,0.25,0.1,0.05")
    ap.add_argument("-r", "--repetitions", type=int, default=7)
    ap.add_argument("-t", "--threads", type=int, default=None)
    a = ap.parse_args(argv)
    fractions = [float(x) for x in a.fractions.split(",")]
    m = sparserun.load(a.model, threads=a.threads, n_ctx=8)
    numba.set_num_threads(m.threads)
    n_ff, n_layer = m.args.n_ff, m.args.n_layer
    rng = np.random.default_rng(0)
    ffns, sets = {}, {}
    for f in fractions:
        sets[f] = [np.sort(rng.choice(n_ff, max(1, int(round(f * n_ff))), replace=False)) for _ in range(n_layer)]
        ffns[f] = SparseFFN(m, Policy(), predictor=lambda li, acts, s=sets[f]: [s[li]])
    x = Acts(rng.standard_normal((1, m.args.dim)).astype(np.float32))

    def run(ffn):
        m.use_ffn(ffn)
        t = time.perf_counter()
        for li in range(n_layer):
            m.ffn(li, Acts(x.x))
        return time.perf_counter() - t

    packs = next(iter(ffns.values())).pack  # every row's SparseFFN shares these units (ffn_pack.load_units)
    used = [p.used for p in packs]

    def read(f):
        t = time.perf_counter()
        for li, p in enumerate(packs):
            read_units(p.units, p.unit_bytes, used[li], sets[f][li], numba.get_num_threads(), SPREAD, READ_AHEAD)
        return time.perf_counter() - t

    rows = {"dense": lambda: run(None), **{f: (lambda f=f: run(ffns[f])) for f in fractions},
            **{("read", f): (lambda f=f: read(f)) for f in fractions}}
    times = {k: [] for k in rows}
    for r in range(a.repetitions + 1):
        for k, fn in rows.items():
            dt = fn()
            if r:  # the first pass compiles and pages in
                times[k].append(dt)
    dense = statistics.median(times["dense"])
    dense_bytes = sum(w.n_bytes for L in m.layers for w in (L.w_gate, L.w_up, L.w_down) if w is not None)
    print(f"FFN of {n_layer} layers, one token, {m.threads} threads, {os.path.basename(a.model)}; medians of {a.repetitions}")
    print("| kept fraction | ms/token | vs dense | target (f + 0.05) | read floor, vs dense | read rate |")
    print("|---|---|---|---|---|---|")
    print(f"| dense | {dense * 1e3:.2f} | 1.00 | | | {dense_bytes / dense / 1e9:.1f} GB/s (dense rate) |")
    for f in fractions:
        t, floor = statistics.median(times[f]), statistics.median(times[("read", f)])
        ok = "met" if t / dense <= f + 0.05 else "missed"
        read_bytes = sum(len(s) * used[li] for li, s in enumerate(sets[f]))
        print(f"| {f:g} | {t * 1e3:.2f} | {t / dense:.3f} | {f + 0.05:.2f} {ok} | {floor / dense:.3f} | "
              f"{read_bytes / floor / 1e9:.1f} GB/s |")


if __name__ == "__main__":
    main()
