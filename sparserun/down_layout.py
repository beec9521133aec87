"""The down projection laid out neuron-major, so one kept neuron's weights are one contiguous row.

GGUF stores ffn_down as (dim rows, n_ff cols): a neuron is a strided column. At first use it is
dequantized, transposed to (n_ff, dim) and stored as:
- float32 rows for F32 models (exact), or
- int8 rows with a float32 scale per 32 values (symmetric, like Q8_0, scales kept apart from the
  quants so the axpy inner loop is flat) for every other type. This re-quantization of already
  quantized weights adds a small error, measured in tests/test_sparse.py and by `sparserun bench`.
The arrays are cached as .npy files (no pickle) under $SPARSERUN_CACHE (default ~/.cache/sparserun),
keyed by the model's tensor fingerprint, and memory-mapped on the next load.
"""
import os

import numpy as np

from .kernels import quant as K
from .kernels import sparse as S


def cache_root():
    return os.environ.get("SPARSERUN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "sparserun")


class NeuronMajorDown:
    """Neuron-major copy of one layer's ffn_down: axpy(idx, h, n, out) adds sum_j h[j] * W[:, idx[j]]."""

    def __init__(self, down, cache_dir, layer):
        self.dim, self.n_ff = down.rows, down.cols
        exact = down.qtype == K.F32
        base = os.path.join(cache_dir, f"down.{layer}")
        paths = [base + ".f32.npy"] if exact else [base + ".q.npy", base + ".s.npy"]
        if not all(os.path.exists(p) for p in paths):
            wt = np.ascontiguousarray(down.dequantize().T)  # (n_ff, dim)
            if exact:
                arrays = [wt]
            else:
                q = np.empty(wt.shape, np.int8)
                s = np.empty((wt.shape[0], wt.shape[1] // K.QK), np.float32)
                S.quantize_rows_q8(wt, q, s)
                arrays = [q, s]
            os.makedirs(cache_dir, exist_ok=True)
            for p, a in zip(paths, arrays):
                tmp = p + f".tmp{os.getpid()}"
                with open(tmp, "wb") as fh:
                    np.save(fh, a, allow_pickle=False)
                os.replace(tmp, p)  # atomic: a half-written cache file is never read
        arrays = [np.load(p, mmap_mode="r", allow_pickle=False) for p in paths]
        for a in arrays:
            if a.shape[0] != self.n_ff:
                raise ValueError(f"stale down-layout cache {base}: remove {cache_dir}")
        self.w = arrays[0] if exact else None
        self.q, self.s = (None, None) if exact else (arrays[0], arrays[1])

    def axpy(self, idx, h, n, out):
        if self.w is not None:
            S.axpy_f32(self.w, idx, h, n, out)
        else:
            S.axpy_q8(self.q, self.s, idx, h, n, out)
