"""How fast this machine reads random neuron units, against a sequential stream of the same bytes.

    python benchmarks/unit_reads.py [--fractions 0.5,0.25] [-r 7] [-t 2] [--unit 3456 --stride 4096]

The sparse FFN's kept neurons are random 3456-byte units (a TinyLlama-shaped Q4_0 predictor pack: gate, up
and down of one neuron), each alone in a 4 KiB page, in huge pages (ffn_pack.py). These pure reads of such
units (one 8-byte load per cache line, no arithmetic), split over the threads as the pack kernel splits them,
are what their bytes cost before any compute. Four ways of reading the units (on the 2 Zen 4 cores this
project is measured on they come within about 10% of each other, in no stable order, all below the stream):
- burst: one unit at a time, the whole unit 8 on prefetched at once;
- spread: one unit at a time, each line read prefetches the same line of the unit 8 on (how the pack kernel
  prefetches, sparse.PREFETCH_AHEAD: the prefetches leave at the pace of the reads);
- lockstep: 8 units at a time, line k of each in turn, no software prefetch (8 hardware streams);
- lockstep+pf: the same, and the first 4 lines of the next 8 units prefetched.
"stream" reads the same number of bytes sequentially, prefetched 1 KiB ahead: what a dense matrix costs.
"ceiling" is the speed-up that skipping can give at most on these bytes: reading every unit as one stream, against
reading the kept ones the best of the four ways. teal's column packs are contiguous units of one input channel's
weights for every output (`--unit 1024 --stride 1024`: a 4-bit column of 2,048 outputs, TinyLlama's o and down;
1280 for q|k|v, 5632 for gate|up).
The sparse FFN's target (at kept fraction f, at most f + 0.05 of the dense FFN's time) asks the kept units to come at (nearly) the stream's rate.
"""
import argparse
import os
import statistics
import sys
import time

import numba
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from sparserun.kernels.simd import prefetch  # noqa: E402
from sparserun.memory import huge_page_buffer  # noqa: E402

UNIT, STRIDE, TOTAL = 3456, 4096, 22 * 5632 * 4096  # 507 MB of units: far more than the caches
AHEAD = 8


BURST, SPREAD, LOCKSTEP, LOCKSTEP_PF = range(4)  # the ways of reading, in the docstring's order


@numba.njit(parallel=True, cache=True)
def read_units(u, stride, used, idx, parts, how, ahead):
    """Load one 8-byte word per cache line of units idx (bytes [0, used) each, stride apart), the units split
    evenly over `parts` threads as pack_ffn splits the kept neurons, read `how` (BURST, SPREAD, LOCKSTEP or
    LOCKSTEP_PF) with `ahead` units of prefetch distance or lockstep width; returns a sum so nothing is
    optimized away."""
    w = u.view(np.uint64)
    n = idx.shape[0]
    chunk = (n + parts - 1) // parts
    tot = np.zeros(parts, np.uint64)
    for c in numba.prange(parts):
        s = np.uint64(0)
        end = min(n, (c + 1) * chunk)
        if how >= LOCKSTEP:
            for j0 in range(c * chunk, end, ahead):
                j1 = min(end, j0 + ahead)
                if how == LOCKSTEP_PF:
                    for t in range(j0 + ahead, min(end, j1 + ahead)):
                        prefetch(u, idx[t] * stride, 256)
                for k in range(0, used // 8, 8):
                    for j in range(j0, j1):
                        s += w[idx[j] * (stride // 8) + k]
        else:
            for j in range(c * chunk, min(end, c * chunk + ahead)):
                prefetch(u, idx[j] * stride, used)
            for j in range(c * chunk, end):
                nxt = idx[j + ahead] * stride if j + ahead < end else -1
                if how == BURST and nxt >= 0:
                    prefetch(u, nxt, used)
                base = idx[j] * (stride // 8)
                for k in range(0, used // 8, 8):
                    if how == SPREAD and nxt >= 0:
                        prefetch(u, nxt + 8 * k, 64)
                    s += w[base + k]
        tot[c] = s
    return tot.sum()


@numba.njit(parallel=True, cache=True)
def read_stream(u, nbytes, parts):
    """Sum one word per cache line of u[:nbytes], split in contiguous halves over the threads."""
    w = u.view(np.uint64)
    n = nbytes // 8
    chunk = (n + parts - 1) // parts
    tot = np.zeros(parts, np.uint64)
    for c in numba.prange(parts):
        s = np.uint64(0)
        for k in range(c * chunk, min(n, (c + 1) * chunk), 8):
            if 8 * k + 1024 < nbytes:
                prefetch(u, 8 * k + 1024, 64)
            s += w[k]
        tot[c] = s
    return tot.sum()


WAYS = {"burst": BURST, "spread": SPREAD, "lockstep": LOCKSTEP, "lockstep+pf": LOCKSTEP_PF}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fractions", default="0.5,0.25")
    ap.add_argument("-r", "--repetitions", type=int, default=7)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--unit", type=int, default=UNIT, help="bytes read of each unit (a multiple of 64)")
    ap.add_argument("--stride", type=int, default=STRIDE, help="bytes from one unit's start to the next's")
    a = ap.parse_args(argv)
    numba.set_num_threads(a.threads)
    unit, stride = a.unit, a.stride
    n_units = TOTAL // stride
    u = huge_page_buffer(n_units * stride)
    u[:] = 1  # touch every page
    rng = np.random.default_rng(0)
    print(f"{a.threads} threads, units of {unit} bytes {stride} apart, medians of {a.repetitions} (GB/s)")
    print("| kept fraction | stream | " + " | ".join(WAYS) + " | ceiling |")
    print("|---" * (3 + len(WAYS)) + "|")
    for f in [float(v) for v in a.fractions.split(",")]:
        idx = np.sort(rng.choice(n_units, int(f * n_units), replace=False)).astype(np.int64)
        nbytes = len(idx) * unit
        runs = {"stream": lambda: read_stream(u, nbytes, a.threads),
                **{k: (lambda h=h: read_units(u, stride, unit, idx, a.threads, h, AHEAD)) for k, h in WAYS.items()}}
        runs["all"] = lambda: read_stream(u, n_units * stride, a.threads)  # the dense matrix: every unit
        rates = {k: [] for k in runs}
        for r in range(a.repetitions + 1):  # interleaved: every way sees the same machine state
            for k, fn in runs.items():
                t = time.perf_counter()
                fn()
                if r:  # the first pass compiles
                    rates[k].append(nbytes / (time.perf_counter() - t) / 1e9)
        med = {k: statistics.median(v) for k, v in rates.items()}
        every = med.pop("all")  # the kept bytes over the time of reading every unit (rates are nbytes / time)
        print(f"| {f:g} | " + " | ".join(f"{v:.1f}" for v in med.values())
              + f" | {max(med[k] for k in WAYS) / every:.2f}x |")


if __name__ == "__main__":
    main()
