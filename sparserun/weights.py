"""Weight matrices as the engine uses them: a RawTensor plus the matmul path its type takes.

Acts carries one activation matrix and, computed once on demand, its int8 block quantization, so
the weights that read the same input (q/k/v, gate/up) share one quantization pass. Matmuls runs such
weights together: one kernel call over the stacked rows of each run of weights of one type and width.
"""
import numpy as np

from .gguf_file import RawTensor
from .kernels import quant as K
from .kernels.krepack import repack_iq4_xs, repack_q2_k, repack_q3_k, repack_q4_k, repack_q5_k, repack_q6_k
from .memory import discard, huge_page_buffer
from .qtypes import type_name

# file type -> (the type of its in-memory copy, the repacking kernel): layouts whose dots need no horizontal
# reduction per block (kernels/krepack.py, quant.repack_q4_0), on the VNNI route and the generic one alike.
REPACK = {K.Q4_K: (K.Q4_KR, repack_q4_k), K.Q5_K: (K.Q5_KR, repack_q5_k), K.Q6_K: (K.Q6_KR, repack_q6_k),
          K.Q3_K: (K.Q3_KR, repack_q3_k), K.Q2_K: (K.Q2_KR, repack_q2_k), K.IQ4_XS: (K.IQ4_XSR, repack_iq4_xs),
          K.Q4_0: (K.Q4_0R, K.repack_q4_0), K.IQ4_NL: (K.IQ4_NLR, K.repack_q4_0)}


class Acts:
    """An activation matrix x (T, n) float32 and its lazily computed int8 blocks (quant.quantize_acts). An FFN's
    input also carries the residual stream it was normalized from (PowerInfer's predictors read that)."""

    def __init__(self, x, residual=None):
        self.x, self.residual = x, residual
        self._forms = self._kforms = None

    def forms(self):
        """(xq, xd, x8, xb, xt, xs): the int8 blocks as int16 values, their scales, as int8 values, the VNNI
        kernels' offset terms, and the repacked Q4_0 dots' transposed values and block offset terms (see
        quant.quantize_acts)."""
        if self._forms is None:
            self._forms = K.acts_forms(self.x)
        return self._forms

    def forms_for(self, qtype):
        """The forms qtype's dense dots read: forms(), or for the K-quants (VNNI or generic route) the same six places
        rounded as llama.cpp's Q8_K (one scale per 256 values; quant.quantize_acts_k), computed once."""
        if qtype in K.Q8K_TYPES:
            if self._kforms is None:
                self._kforms = K.acts_forms_k(self.x)
            return self._kforms
        return self.forms()


class Weight:
    """A (rows, cols) weight matrix read in place from the GGUF memory map, or an in-memory copy of one (in_memory:
    `origin` is the file's, and the copy can be released and restored)."""

    origin = None  # the file's Weight this copy was made from
    released = False  # the copy's pages given back to the OS (release); restore() reads them from the file again

    def __init__(self, t):
        self.name, self.qtype, self.rows, self.cols = t.name, t.qtype, t.rows, t.cols
        self.raw, self.row_bytes = t.raw, t.row_bytes
        if self.raw.flags.writeable:  # every weight readonly: one array type, so any of them stack (matmul)
            self.raw = self.raw.view()
            self.raw.flags.writeable = False
        self.type_name = t.type_name
        self.f32 = self.raw.view(np.float32).reshape(t.rows, t.cols) if t.qtype == K.F32 else None
        self._stack = None

    @property
    def n_bytes(self):
        return self.raw.nbytes

    def matmul(self, acts, out=None):
        """out (T, rows) = acts.x (T, cols) @ W.T"""
        if self._stack is None:
            self._stack = Matmuls([self])
        return self._stack.run(0, acts, out)

    def subset(self, ids, name=None):
        """A Weight of rows ids of this one, copied into one contiguous huge-page buffer: the gathered rows stream as
        one matrix (the hybrid's CPU share of gate and up rows, the hot head's rows)."""
        self.restore()
        raw = huge_page_buffer(len(ids) * self.row_bytes)
        raw.reshape(len(ids), self.row_bytes)[:] = self.raw.reshape(self.rows, self.row_bytes)[ids]
        raw.flags.writeable = False
        return Weight(RawTensor(name or f"{self.name}[subset]", self.qtype, len(ids), self.cols, raw, self.row_bytes))

    def repacked(self, into=None):
        """This weight with its rows in the integer dots' layout (REPACK: Q4_0 and the
        K-quants Q4_K, Q5_K and Q6_K, on every CPU), as an in-memory copy (into: the uint8 slice to hold it, see in_memory_together): the
        same bytes per row, so row offsets and row subsets work unchanged; dequantize() still gives the same values
        (the GPU placement uploads from it). The copy lies in huge pages (memory.Arena says why)."""
        qtype, repack = REPACK[self.qtype]
        raw = huge_page_buffer(self.raw.nbytes) if into is None else into
        repack(self.raw, self.rows, self.row_bytes, raw)
        w = Weight(RawTensor(self.name, qtype, self.rows, self.cols, raw, self.row_bytes))
        w.type_name = type_name(qtype)
        return w

    def in_memory(self, into=None):
        """This weight copied out of the file mapping into huge pages (into: as for repacked), the form the kernels
        read: repacked where REPACK says (Q4_0: 11% faster from DRAM than its own layout), any other type as it
        is. A file mapping's 4 KiB pages cost a streaming matvec its hardware prefetch at every page boundary and
        a TLB miss per page (memory.Arena gives the figures)."""
        raw = huge_page_buffer(self.raw.nbytes) if into is None else into
        if self.qtype in REPACK:
            w = self.repacked(raw)
        else:
            raw[:] = self.raw
            w = Weight(RawTensor(self.name, self.qtype, self.rows, self.cols, raw, self.row_bytes))
        w.origin, w._buf = self, raw
        return w

    def row_block(self, r0, n):
        """Rows r0 .. r0 + n as a Weight viewing these bytes (a fused matrix's parts): an in-memory copy's block keeps
        the same block of the file's rows as its origin (the repacked layouts keep each row's bytes in place)."""
        raw = self.raw[r0 * self.row_bytes:(r0 + n) * self.row_bytes]
        part = Weight(RawTensor(self.name, self.qtype, n, self.cols, raw, self.row_bytes))
        part.type_name = self.type_name
        if self.origin is not None:
            part.origin = self.origin.row_block(r0, n)
            part._buf = self._buf[r0 * self.row_bytes:(r0 + n) * self.row_bytes]
        return part

    def release(self):
        """Give this in-memory copy's pages back to the OS: a matrix that now runs from another copy only (teal's
        column packs). Reading it restores it first (Matmuls.run, rows_f32); the caller that made it redundant
        restores it when that ends (Model.set_sparsity). Returns whether it is released (False where this Weight is
        the file's own bytes, or the OS cannot)."""
        if not self.released and self.origin is not None:
            self.released = discard(self._buf)
        return self.released

    def restore(self):
        """Read a released copy back from the file (repacked again where it was)."""
        if self.released:
            src = self.origin
            if src.qtype in REPACK and REPACK[src.qtype][0] == self.qtype:
                REPACK[src.qtype][1](src.raw, src.rows, src.row_bytes, self._buf)
            else:
                self._buf[:] = src.raw
            discard(src.raw, inner=False)  # the file's pages: read once more, not kept
            self.released = False

    def rows_f32(self, ids):
        """Dequantized rows ids (len(ids), cols): embedding lookup."""
        self.restore()
        ids = np.ascontiguousarray(ids, dtype=np.int64)
        out = np.empty((len(ids), self.cols), np.float32)
        K.gather_rows(self.raw, self.row_bytes, self.qtype, self.cols, ids, out)
        return out

    def dequantize(self):
        return self.rows_f32(np.arange(self.rows))

    def vector(self):
        """A 1-row weight (norm gains, rope factors) as a float32 vector."""
        return self.rows_f32(np.zeros(1, np.int64))[0]


class TransposedWeight:
    """A (rows, cols) matrix W stored as its transpose: `t`, a Weight of cols rows of `rows` values, row j being
    column j of W (PowerInfer's ffn_down_t holds ffn_down so, neuron by neuron). `source`: the stored rows as the file
    holds them (t may be an in-memory copy in the kernels' layout); the neuron packs take their down columns from
    it without re-quantizing (ffn_pack.down_columns)."""

    f32 = None

    def __init__(self, t, source):
        self.t, self.source = t, source
        self.name, self.qtype, self.type_name = t.name, t.qtype, t.type_name
        self.rows, self.cols = t.cols, t.rows

    @property
    def n_bytes(self):
        return self.t.n_bytes

    def matmul(self, acts, out=None):
        """out (T, rows) = acts.x (T, cols) @ W.T: one axpy per stored row (kernels.transposed)."""
        import numba

        from .kernels.transposed import matmul_rows_t

        h = np.ascontiguousarray(acts.x, np.float32)
        if out is None:
            out = np.empty((h.shape[0], self.rows), np.float32)
        parts = np.empty((max(1, numba.get_num_threads()), h.shape[0], self.rows), np.float32)
        matmul_rows_t(self.t.raw, self.t.row_bytes, self.t.qtype, h, parts, out)
        return out

    def dequantize(self):
        return np.ascontiguousarray(self.t.dequantize().T)


def in_memory_together(ws, alloc=huge_page_buffer):
    """Weights of one type and row width (stackable) in memory (Weight.in_memory), back to back in one buffer
    (alloc(nbytes): a memory.Arena's take, say), in order: a Matmuls over them then reads one array (see joined)."""
    buf = alloc(sum(w.raw.nbytes for w in ws))
    out, at = [], 0
    for w in ws:
        out.append(w.in_memory(buf[at:at + w.raw.nbytes]))
        at += w.raw.nbytes
    return out


def _root(a):
    while isinstance(a.base, np.ndarray):
        a = a.base
    return a


def joined(raws):
    """raws (1-D uint8 views) as one readonly array when they lie back to back in one buffer, in order (weights
    made by in_memory_together); else None. One array is one stream for the kernel: q/k/v of 22 TinyLlama layers
    read 2.92 ms as three arrays and 2.67 ms as one (A/B from DRAM, 2 threads)."""
    root = _root(raws[0])
    if len(raws) < 2 or root.ndim != 1 or any(_root(r) is not root for r in raws):
        return None
    start = raws[0].ctypes.data - root.ctypes.data
    at = start
    for r in raws:
        if r.ctypes.data - root.ctypes.data != at:
            return None
        at += r.nbytes
    one = root[start:at].view()
    one.flags.writeable = False
    return one


def stackable(a, b):
    """Whether weights a and b can share one matmul call (same type and row layout)."""
    return (a.qtype, a.cols, a.row_bytes) == (b.qtype, b.cols, b.row_bytes)


class Matmuls:
    """Weights that read one input (q, k, v; gate, up), each run of stackable ones computed by one kernel
    call over their stacked rows: one parallel region and one memory stream instead of one per weight.
    Built once per layer: the stacks' row offsets and raw tuples are computed here, not per token."""

    def __init__(self, ws):
        self.weights = list(ws)
        # (first weight, raws, f32 matrices or None, the kernel's row0 (one per raw), the weights' row0)
        self.groups = []
        i = 0
        while i < len(ws):
            j = i + 1
            while j < len(ws) and stackable(ws[i], ws[j]):
                j += 1
            g = ws[i:j]
            f32 = tuple(w.f32 for w in g) if g[0].f32 is not None else None
            row0 = np.cumsum([0] + [w.rows for w in g])  # each weight's first output row, then the total
            one = joined([w.raw for w in g])
            raws, rows0 = ((one,), row0[[0, -1]]) if one is not None else (tuple(w.raw for w in g), row0)
            self.groups.append((g[0], raws, f32, rows0, row0))
            i = j
        self._copies = [w for w in self.weights if getattr(w, "origin", None) is not None]  # those that may be released

    def restore(self):
        """Restore released weights before a kernel reads them (a policy that runs them from other copies released
        them: a read of zero pages would be silently wrong)."""
        for w in self._copies:
            if w.released:
                w.restore()

    def run(self, k, acts, out=None):
        """out (T, rows of group k's stack) = acts.x @ [W_1; W_2; ...].T"""
        w, raws, f32, row0, _ = self.groups[k]
        if self._copies:
            self.restore()
        if out is None:
            out = np.empty((acts.x.shape[0], row0[-1]), np.float32)
        if w.qtype in K.X8_MATMUL:  # the K-quants' and Q4_1 / Q5_1's integer dots, VNNI or generic
            K.X8_MATMUL[w.qtype](raws, w.row_bytes, row0, *K.dot_forms(w.qtype, acts.forms_for(w.qtype)), out)
        elif w.qtype in K.VNNI_MATMUL and K.HAS_VNNI:
            K.VNNI_MATMUL[w.qtype](raws, w.row_bytes, row0, *K.dot_forms(w.qtype, acts.forms_for(w.qtype)), out)
        elif w.qtype in K.INT8_MATMUL:
            K.INT8_MATMUL[w.qtype](raws, w.row_bytes, row0, *K.dot_forms(w.qtype, acts.forms()), out)
        elif f32 is not None:
            K.matmul_f32(f32, row0, acts.x, out)
        else:
            K.matmul_dequant(raws, w.row_bytes, w.qtype, row0, acts.x, out)
        return out

    def __call__(self, acts):
        """[acts.x @ W.T for W in the weights], C-contiguous (T == 1: slices of a group's output; a batch:
        copies of its column blocks, which the attention and RoPE kernels read as rows)."""
        outs = []
        for k, (_, _, _, _, row0) in enumerate(self.groups):
            y = self.run(k, acts)
            for a, b in zip(row0[:-1], row0[1:]):
                outs.append(y[:, a:b] if y.shape[0] == 1 else np.ascontiguousarray(y[:, a:b]))
        return outs
