"""python benchmarks/kquant_matmul.py [TYPES]   (TYPES: comma-separated, default Q4_0,Q4_K,Q5_K,Q6_K,Q3_K,Q2_K)

The dense matmul of each type as the loader holds it (Weight.in_memory: Q4_0 and the K-quants repacked), on
random rows 2048 wide: one token over 65,536 rows (a stream from DRAM: GB/s) and a 64-token batch over 8,192 rows
(the batch tiles: G multiply-adds/s). Medians of 9 calls, in one process."""
import os
import statistics as st
import sys
import time

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from sparserun.gguf_file import RawTensor  # noqa: E402
from sparserun.weights import Acts, Matmuls, Weight  # noqa: E402

rng = np.random.default_rng(0)


def weight(qtype, rows, cols):
    """Random blocks of qtype with sane fp16 scales."""
    block, nbytes = GGML_QUANT_SIZES[qtype]
    b = rng.integers(0, 256, (rows * cols // block, nbytes), dtype=np.uint8)
    scale = lambda: rng.uniform(0.001, 0.05, len(b)).astype(np.float16).view(np.uint8).reshape(-1, 2)  # noqa: E731
    if qtype in (Q.Q4_K, Q.Q5_K):
        b[:, 0:2], b[:, 2:4] = scale(), scale()
    elif qtype == Q.Q6_K:
        b[:, 208:210] = scale()
    elif qtype == Q.Q3_K:
        b[:, 108:110] = scale()
    elif qtype == Q.Q2_K:
        b[:, 80:82], b[:, 82:84] = scale(), scale()
    else:
        b[:, 0:2] = scale()
    raw = b.reshape(-1)
    return Weight(RawTensor("w", int(qtype), rows, cols, raw, raw.nbytes // rows))


for qt in [Q[a] for a in (sys.argv[1] if len(sys.argv) > 1 else "Q4_0,Q4_K,Q5_K,Q6_K,Q3_K,Q2_K").split(",")]:
    for rows, T in ((65536, 1), (8192, 64)):
        w = weight(qt, rows, 2048).in_memory()
        m = Matmuls([w])
        x = Acts(rng.standard_normal((T, 2048)).astype(np.float32))
        x.forms_for(w.qtype)
        out = np.empty((T, rows), np.float32)
        m.run(0, x, out)
        ts = []
        for _ in range(9):
            t0 = time.perf_counter()
            m.run(0, x, out)
            ts.append(time.perf_counter() - t0)
        t = st.median(ts)
        print(f"{w.type_name:6s} T={T:3d}: {t * 1e3:7.2f} ms  {w.raw.nbytes / t / 1e9:6.1f} GB/s  "
              f"{rows * T * 2048 / t / 1e9:6.1f} G MAC/s")
