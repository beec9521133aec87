"""Weights as the GPU holds them (host side: numpy only, no CUDA import; the placement counts bytes with it).

A matrix goes to the device as n rows of `cols` values in one of four formats, which gpu_kernels' warp kernels
read with the dequantization in registers:
    F32  float32 (n, cols)                      F32 models: exact
    F16  float16 (n, cols)                      F16 / BF16 models
    Q4   per 32 values 16 bytes of nibbles in Q4_0's order (value j low, j + 16 high) and one fp16 scale:
         Q4_0 rows as the file holds them (no error added), and the down columns of the 4-bit types
    Q8   per 32 values 32 int8 and one fp16 scale: Q8_0 rows as the file holds them; the rows of every other
         type (K-quants, Q5_0, IQ4_NL, ...) re-quantized (error within 0.57 of a step, a step being 1/127 of
         a block's largest value: half a step, and the fp16 rounding of the scale), and the down columns of every type but the 4-bit ones and F32
The down columns (a neuron's weights into every output) are the CPU neuron packs' own (ffn_pack.down_columns),
so the GPU's hot neurons and the CPU's cold ones use the same values.
Quants are uint32 words (n, cols / 8 or cols / 4): a warp's 32 lanes load 128 contiguous bytes at once; the
scales are float16 (n, cols / 32). The bytes are the file's (18 per 32 weights for Q4_0, 34 for Q8_0), so a
VRAM budget places as many rows as the quantized file would fill, where float16 rows took 3.5x a Q4_0 file's.
"""
from dataclasses import dataclass

import numpy as np

from . import qtypes as K

F32, F16, Q4, Q8 = 0, 1, 2, 3
NAMES = {F32: "f32", F16: "f16", Q4: "q4_0", Q8: "q8_0"}
QK = 32


def row_format(qtype):
    """The device format of a matrix's rows, by its file type."""
    if qtype == K.F32:
        return F32
    if qtype in (K.F16, K.BF16):
        return F16
    return Q4 if qtype in (K.Q4_0, K.Q4_0R) else Q8


def column_format(qtype):
    """The device format of a down matrix's columns: the CPU neuron packs' (ffn_pack.down_kind)."""
    from .ffn_pack import down_kind
    from .kernels import sparse as S

    return {S.DOWN_F32: F32, S.DOWN_Q4: Q4, S.DOWN_Q8: Q8}[down_kind(qtype)]


def row_bytes(fmt, cols):
    """Device bytes of one row of cols values."""
    return {F32: 4 * cols, F16: 2 * cols, Q4: cols // 2 + cols // 16, Q8: cols + cols // 16}[fmt]


@dataclass
class HostRows:
    """Rows ready to upload: fmt, q (n, cols) float32/float16 for F32/F16, else (n, words) uint32 quants, and
    s (n, cols / 32) float16 scales (a (1, 1) placeholder for the float formats, which need none)."""

    fmt: int
    q: np.ndarray
    s: np.ndarray

    @property
    def n_bytes(self):
        return self.q.nbytes + (self.s.nbytes if self.fmt in (Q4, Q8) else 0)


def _from_blocks(blocks, fmt):
    """Q4_0 / Q8_0 blocks (n, cols / 32, 2 + quant bytes) uint8 -> HostRows, the bytes reordered only."""
    n = blocks.shape[0]
    q = np.ascontiguousarray(blocks[:, :, 2:]).reshape(n, -1).view(np.uint32)
    s = np.ascontiguousarray(blocks[:, :, :2]).reshape(n, -1).view(np.float16)
    return HostRows(fmt, q, s)


def quantize(x, fmt):
    """Float32 rows x (n, cols) -> HostRows in fmt (ffn_pack.quantize_columns' rounding for Q4 / Q8)."""
    x = np.ascontiguousarray(x, np.float32)
    if fmt == F32:
        return HostRows(F32, x, np.zeros((1, 1), np.float16))
    if fmt == F16:
        return HostRows(F16, x.astype(np.float16), np.zeros((1, 1), np.float16))
    from .ffn_pack import quantize_columns
    from .kernels import sparse as S

    return _from_packed(quantize_columns(x, S.DOWN_Q4 if fmt == Q4 else S.DOWN_Q8), fmt, x.shape[1])


def _from_packed(packed, fmt, cols):
    """Rows in the neuron packs' layout (n, bytes) uint8 (ffn_pack.quantize_columns: float32 values, or the quants
    then the fp16 scales) -> HostRows, the bytes split only."""
    n = packed.shape[0]
    if fmt == F32:
        return HostRows(F32, np.ascontiguousarray(packed[:, :4 * cols]).view(np.float32).reshape(n, cols),
                        np.zeros((1, 1), np.float16))
    qb = cols // 2 if fmt == Q4 else cols
    return HostRows(fmt, np.ascontiguousarray(packed[:, :qb]).view(np.uint32),
                    np.ascontiguousarray(packed[:, qb:qb + 2 * cols // QK]).view(np.float16))


def rows(w, ids=None, gguf=None):
    """Rows ids (all when None) of a weights.Weight in its device format. Q4_0 and Q8_0 rows are taken from the
    file's own blocks (gguf: the model's GGUFFile; the in-memory copy may be repacked for the CPU's kernels)."""
    fmt = row_format(w.qtype)
    ids = np.arange(w.rows) if ids is None else np.asarray(ids, np.int64)
    if fmt in (Q4, Q8) and w.qtype in (K.Q4_0, K.Q4_0R, K.Q8_0):
        src = None
        if gguf is not None and gguf.has(w.name):
            t = gguf.tensor(w.name)
            if (t.rows, t.cols) == (w.rows, w.cols) and t.qtype in (K.Q4_0, K.Q8_0):
                src = t
        if src is None and w.qtype in (K.Q4_0, K.Q8_0):
            src = w
        if src is not None:
            blocks = src.raw.reshape(src.rows, src.row_bytes)[ids].reshape(len(ids), src.cols // QK, -1)
            return _from_blocks(blocks, fmt)
    return quantize(w.rows_f32(ids), fmt)


def down_columns(down, ids):
    """The down columns of neurons ids (n, dim) in the device format of column_format: the CPU packs' values."""
    from .ffn_pack import down_columns as pack_columns
    from .kernels import sparse as S

    fmt = column_format(down.qtype)
    packed = pack_columns(down, {F32: S.DOWN_F32, Q4: S.DOWN_Q4, Q8: S.DOWN_Q8}[fmt])[np.asarray(ids, np.int64)]
    return _from_packed(packed, fmt, down.rows)


def dequantize(h, cols):
    """HostRows -> float32 (n, cols): what the GPU kernels compute with (the tests' reference)."""
    if h.fmt in (F32, F16):
        return h.q.astype(np.float32)
    n = h.q.shape[0]
    b = h.q.view(np.uint8).reshape(n, cols // QK, -1)
    if h.fmt == Q4:
        v = np.concatenate([b & 15, b >> 4], axis=2).astype(np.float32) - 8  # (n, blocks, 32)
    else:
        v = b.view(np.int8).astype(np.float32)
    return (v * h.s.astype(np.float32)[:, :, None]).reshape(n, cols)
