"""The down projection laid out neuron-major, so one kept neuron's weights are one contiguous row.

GGUF stores ffn_down as (dim rows, n_ff cols): a neuron is a strided column. At first use it is
dequantized, transposed to (n_ff, dim) and re-quantized per 32 values with the scales kept apart from
the quants (so the axpy inner loop is flat), at the precision of the source:
- float32 rows for F32 models (exact);
- 4-bit rows (Q4_0's nibble order and rounding) for 4-bit sources (Q4_0, Q4_K): as many bytes per
  neuron as the original, so skipping neurons saves what it should;
- int8 rows for everything else (Q8_0, Q5_K, Q6_K, F16, BF16).
Re-quantizing already quantized weights adds error; tests/test_sparse.py measures it against the
dense path and `sparserun bench` reports the end-to-end fidelity.
The arrays are cached as .npy files (no pickle) under $SPARSERUN_CACHE (default ~/.cache/sparserun),
keyed by the model's tensor fingerprint, and memory-mapped on the next load.
"""
import os

import numpy as np

from .kernels import quant as K
from .kernels import sparse as S


FOUR_BIT = (K.Q4_0, K.Q4_K)


def cache_root():
    return os.environ.get("SPARSERUN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "sparserun")


class NeuronMajorDown:
    """Neuron-major copy of one layer's ffn_down: axpy(idx, h, n, out) adds sum_j h[j] * W[:, idx[j]]."""

    def __init__(self, down, cache_dir, layer):
        self.dim, self.n_ff = down.rows, down.cols
        self.kind = "f32" if down.qtype == K.F32 else "q4" if down.qtype in FOUR_BIT else "q8"
        base = os.path.join(cache_dir, f"down.{layer}")
        paths = [f"{base}.f32.npy"] if self.kind == "f32" else [f"{base}.{self.kind}.npy", f"{base}.{self.kind}s.npy"]
        if not all(os.path.exists(p) for p in paths):
            os.makedirs(cache_dir, exist_ok=True)
            for p, a in zip(paths, self._build(down)):
                tmp = p + f".tmp{os.getpid()}"
                with open(tmp, "wb") as fh:
                    np.save(fh, a, allow_pickle=False)
                os.replace(tmp, p)  # atomic: a half-written cache file is never read
        arrays = [np.load(p, mmap_mode="r", allow_pickle=False) for p in paths]
        if any(a.shape[0] != self.n_ff for a in arrays):
            raise ValueError(f"stale down-layout cache {base}: remove {cache_dir}")
        self.arrays = arrays

    def _build(self, down):
        wt = np.ascontiguousarray(down.dequantize().T)  # (n_ff, dim)
        if self.kind == "f32":
            return [wt]
        s = np.empty((wt.shape[0], wt.shape[1] // K.QK), np.float32)
        if self.kind == "q4":
            q = np.empty((wt.shape[0], wt.shape[1] // 2), np.uint8)
            S.quantize_rows_q4(wt, q, s)
        else:
            q = np.empty(wt.shape, np.int8)
            S.quantize_rows_q8(wt, q, s)
        return [q, s]

    def axpy(self, idx, h, n, out):
        if self.kind == "f32":
            S.axpy_f32(self.arrays[0], idx, h, n, out)
        elif self.kind == "q4":
            S.axpy_q4(self.arrays[0], self.arrays[1], idx, h, n, out)
        else:
            S.axpy_q8(self.arrays[0], self.arrays[1], idx, h, n, out)
