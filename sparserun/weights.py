"""Weight matrices as the engine uses them: a RawTensor plus the matmul path its type takes.

Acts carries one activation matrix and, computed once on demand, its int8 block quantization, so
the weights that read the same input (q/k/v, gate/up) share one quantization pass.
"""
import numpy as np

from .kernels import quant as K


class Acts:
    """An activation matrix x (T, n) float32 and its lazily computed int8 blocks (values int16-stored)."""

    def __init__(self, x):
        self.x = x
        self._q = None
        self._q8 = None

    def int8(self):
        if self._q is None:
            T, n = self.x.shape
            xq, xd = np.empty((T, n), np.int16), np.empty((T, n // K.QK), np.float32)
            K.quantize_acts(self.x, xq, xd)
            self._q = (xq, xd)
        return self._q

    def int8_vnni(self):
        """The same blocks as int8 values (x8 (T, n) int8), their scales xd, and xb (T, n/4) int32: the VNNI kernels'
        format (see quant.pack_acts_i8)."""
        if self._q8 is None:
            xq, xd = self.int8()
            T, n = xq.shape
            x8, xb = np.empty((T, n), np.int8), np.empty((T, n // 4), np.int32)
            K.pack_acts_i8(xq, x8, xb)
            self._q8 = (x8, xd, xb)
        return self._q8


class Weight:
    """A (rows, cols) weight matrix read in place from the GGUF memory map."""

    def __init__(self, t):
        self.name, self.qtype, self.rows, self.cols = t.name, t.qtype, t.rows, t.cols
        self.raw, self.row_bytes = t.raw, t.row_bytes
        self.type_name = t.type_name
        self.f32 = t.raw.view(np.float32).reshape(t.rows, t.cols) if t.qtype == K.F32 else None

    @property
    def n_bytes(self):
        return self.raw.nbytes

    def matmul(self, acts, out=None):
        """out (T, rows) = acts.x (T, cols) @ W.T"""
        T = acts.x.shape[0]
        if out is None:
            out = np.empty((T, self.rows), np.float32)
        if self.qtype == K.Q4_0 and K.HAS_VNNI:
            x8, xd, xb = acts.int8_vnni()
            K.matmul_q4_0_vnni(self.raw, self.row_bytes, self.rows, x8, xd, xb, out)
        elif self.qtype in K.INT8_MATMUL:
            xq, xd = acts.int8()
            K.INT8_MATMUL[self.qtype](self.raw, self.row_bytes, self.rows, xq, xd, out)
        elif self.f32 is not None:
            K.matmul_f32(self.f32, acts.x, out)
        else:
            K.matmul_dequant(self.raw, self.row_bytes, self.qtype, self.rows, acts.x, out)
        return out

    def rows_f32(self, ids):
        """Dequantized rows ids (len(ids), cols): embedding lookup."""
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        out = np.empty((len(ids), self.cols), np.float32)
        K.gather_rows(self.raw, self.row_bytes, self.qtype, self.cols, ids, out)
        return out

    def dequantize(self):
        return self.rows_f32(np.arange(self.rows))

    def vector(self):
        """A 1-row weight (norm gains, rope factors) as a float32 vector."""
        return self.rows_f32(np.zeros(1, np.int64))[0]
