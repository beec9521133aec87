"""python benchmarks/batch_matmul.py

A/B in one process: the batch matmul of a TinyLlama up/gate-sized repacked Q4_0 matrix (5632 x 2048), T = 64:
the old kernel (per row, each token's dot in turn: quant._make_matmul(dot_row_q4_0r_vnni)) against
quant.matmul_q4_0r_vnni (tiles, 4 tokens per dot). Interleaved, medians."""
import os
import statistics as st
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from sparserun.kernels import quant as K  # noqa: E402
from sparserun.kernels.simd import dot_row_q4_0r_vnni  # noqa: E402
from sparserun.weights import Acts  # noqa: E402

if not K.HAS_VNNI:
    sys.exit('the repacked Q4_0 kernels need an AVX512-VNNI CPU')
old = K._make_matmul(dot_row_q4_0r_vnni)
rng = np.random.default_rng(0)
rows, cols = 5632, 2048
rb = cols // 32 * 18
raw = rng.integers(0, 256, rows * rb, dtype=np.uint8)
raw.reshape(rows, cols // 32, 18)[:, :, 1] = 0x2c
rp = np.empty_like(raw); K.repack_q4_0(raw, rows, rb, rp)
raws = (rp,)
row0 = np.array([0, rows], np.int64)
for T in (16, 64, 256):
    x = Acts(rng.standard_normal((T, cols)).astype(np.float32)); xt, xd, xs = K.dot_forms(K.Q4_0R, x.forms())
    a = np.empty((T, rows), np.float32); b = np.empty((T, rows), np.float32)
    old(raws, rb, row0, xt, xd, xs, a); K.matmul_q4_0r_vnni(raws, rb, row0, xt, xd, xs, b)
    assert np.array_equal(a, b)
    ts = {"old": [], "new": []}
    for r in range(15):
        t0 = time.perf_counter(); old(raws, rb, row0, xt, xd, xs, a); ts["old"].append(time.perf_counter() - t0)
        t0 = time.perf_counter(); K.matmul_q4_0r_vnni(raws, rb, row0, xt, xd, xs, b); ts["new"].append(time.perf_counter() - t0)
    o, n = st.median(ts["old"]), st.median(ts["new"])
    print(f"T={T}: old {o*1e3:.2f} ms, new {n*1e3:.2f} ms, {o/n:.2f}x (identical results)")
