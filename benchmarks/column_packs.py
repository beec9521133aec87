"""What teal's column packs cost against the dense matrices, per input group, at a few kept shares.

    python benchmarks/column_packs.py MODEL [--kept 0.5,0.75,0.9] [-r 5] [--threads 2] [--hot] [--batch T]

For each input group (q|k|v, o, gate|up, down) the group's column packs of every layer (teal.ColumnPack.for_group)
run one decode token's product at each kept share (the channels of a random input above its quantile), interleaved
with the dense matmuls of the same matrices; medians of -r repetitions, as a ratio to dense. --hot repeats one layer
instead (its units stay in cache) and reports G weights/s: the kernel's compute alone. --batch T runs a prompt batch
of T tokens instead (kernels.columns.column_matmul, each token its own kept channels, against the dense batched
matmuls).
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
from sparserun.ffn_pack import cache_root  # noqa: E402
from sparserun.teal import GROUPS, ColumnPack, One, _group_weights  # noqa: E402
from sparserun.weights import Acts, Matmuls  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("--kept", default="0.5,0.75,0.9")
    ap.add_argument("-r", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--hot", action="store_true")
    ap.add_argument("--batch", type=int, default=1)
    a = ap.parse_args()
    kept = [float(k) for k in a.kept.split(",")]
    m = sparserun.load(a.model, threads=a.threads)
    numba.set_num_threads(a.threads)
    cache_dir = os.path.join(cache_root(), m.gguf.fingerprint()[:32])
    rng = np.random.default_rng(0)
    layers = [0] * 20 if a.hot else range(m.args.n_layer)
    for g in range(len(GROUPS)):
        packs = [ColumnPack.for_group(_group_weights(m, li, g), cache_dir, li, g) for li in layers]
        if any(p is None for p in packs):
            print(f"{GROUPS[g]}: outputs not whole blocks of 32, no column packs")
            continue
        mats = [(One(m.layers[li].w_down) if g == 3 else Matmuls(_group_weights(m, li, g))) for li in layers]
        n_in = packs[0][0].n_in
        n_out = sum(p.n_out for p in packs[0])
        idx, coef = np.empty(n_in, np.int64), np.empty(n_in, np.float32)
        x = rng.standard_normal((a.batch, n_in)).astype(np.float32)
        times = {k: [] for k in ["dense"] + kept}
        for _ in range(a.r + 1):  # the first repetition pages everything in and is dropped
            t0 = time.perf_counter()
            for q in mats:
                q(Acts(x))
            times["dense"].append(time.perf_counter() - t0)
            for f in kept:
                t = np.float32(np.quantile(np.abs(x), 1 - f))
                t0 = time.perf_counter()
                for ps in packs:
                    for p in ps:
                        if a.batch > 1:
                            p.run_batch(x, t, 0)
                        else:
                            p.run(x[0], t, idx, coef)
                times[f].append(time.perf_counter() - t0)
        med = {k: statistics.median(v[1:]) for k, v in times.items()}
        line = f"{GROUPS[g]}: dense {med['dense'] * 1e3:.2f} ms; " + ", ".join(
            f"kept {f:g}: {med[f] / med['dense']:.2f}x dense" + (
                f" ({(f if a.batch == 1 else a.batch) * n_in * n_out * len(layers) / med[f] / 1e9:.0f} G weights/s)" if a.hot else "")
            for f in kept)
        print(line)


if __name__ == "__main__":
    main()
