"""The product with a matrix stored transposed (PowerInfer's ffn_down_t: ffn_down held neuron by neuron).

out (T, cols) = h (T, n) @ S, S (n, cols) in a GGUF type, row j of S being column j of the matrix the forward
means. Each stored row is dequantized once and added, scaled by h[t, j], into every token's output (an axpy per
row), so a row whose coefficients are all zero (a masked prompt batch's dropped neurons) is not read at all.
"""
import numpy as np
from numba import njit, prange

from .quant import dequant_row


@njit(parallel=True, cache=True)
def matmul_rows_t(raw, row_bytes, qtype, h, parts, out):
    """out (T, cols) = h (T, n) @ rows (n, cols) of type qtype at raw (row j at raw[j*row_bytes:]). parts (P, T, cols)
    float32: one partial sum per worker (each takes a contiguous run of rows), added up at the end."""
    T, n = h.shape
    cols = out.shape[1]
    P = parts.shape[0]
    chunk = (n + P - 1) // P
    for p in prange(P):
        acc = parts[p]
        acc[:] = 0.0
        buf = np.empty(cols, np.float32)
        for j in range(p * chunk, min(n, (p + 1) * chunk)):
            live = False
            for t in range(T):
                if h[t, j] != 0.0:
                    live = True
                    break
            if not live:
                continue
            dequant_row(raw, j * row_bytes, qtype, cols, buf)
            for t in range(T):
                c = h[t, j]
                if c != 0.0:
                    for k in range(cols):
                        acc[t, k] += c * buf[k]
    for t in prange(T):
        for k in range(cols):
            s = np.float32(0.0)
            for p in range(P):
                s += parts[p, t, k]
            out[t, k] = s
