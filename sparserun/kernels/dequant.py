"""Dequantizers of the types small models' files fall back to (llama.cpp's quantizer picks them for rows whose length
is not a multiple of 256): Q4_1, Q5_0, Q5_1, IQ4_NL (32-value blocks), and the 256-value IQ4_XS, Q2_K and Q3_K.

Each writes the n values stored at raw[off:] into out[:n] as float32, bit-identical to gguf.quants.dequantize
(tests/test_quant_types.py): the same products in the same order (scale x quant, then + min). Block layouts are
ggml's (ggml-common.h); kernels/quant.dequant_row dispatches here.
"""
import numpy as np
from numba import njit

from .simd import load_f16

# IQ4_NL / IQ4_XS: the 16 non-linear levels a nibble indexes (ggml-common.h kvalues_iq4nl)
IQ4_LEVELS = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.float32)


@njit(cache=True, inline="always")
def _qh_bit(raw, p, j):
    """Bit j (0..31) of the little-endian uint32 at raw[p:] (Q5_0 / Q5_1's fifth bits)."""
    return (np.int32(raw[p + (j >> 3)]) >> (j & 7)) & 1


@njit(cache=True)
def dequant_q4_1(raw, off, n, out):
    """Blocks of 20 bytes: d, m (f16), 16 bytes of nibbles (low: values 0-15, high: 16-31); value = d q + m."""
    for b in range(n // 32):
        p = off + b * 20
        d, m = load_f16(raw, p), load_f16(raw, p + 2)
        for j in range(16):
            q = raw[p + 4 + j]
            out[b * 32 + j] = d * np.float32(q & 15) + m
            out[b * 32 + j + 16] = d * np.float32(q >> 4) + m


@njit(cache=True)
def dequant_q5_0(raw, off, n, out):
    """Blocks of 22 bytes: d (f16), qh (32 fifth bits), 16 bytes of nibbles; value = d (q - 16)."""
    for b in range(n // 32):
        p = off + b * 22
        d = load_f16(raw, p)
        for j in range(16):
            q = np.int32(raw[p + 6 + j])
            out[b * 32 + j] = d * np.float32(((q & 15) | (_qh_bit(raw, p + 2, j) << 4)) - 16)
            out[b * 32 + j + 16] = d * np.float32(((q >> 4) | (_qh_bit(raw, p + 2, j + 16) << 4)) - 16)


@njit(cache=True)
def dequant_q5_1(raw, off, n, out):
    """Blocks of 24 bytes: d, m (f16), qh, 16 bytes of nibbles; value = d q + m."""
    for b in range(n // 32):
        p = off + b * 24
        d, m = load_f16(raw, p), load_f16(raw, p + 2)
        for j in range(16):
            q = np.int32(raw[p + 8 + j])
            out[b * 32 + j] = d * np.float32((q & 15) | (_qh_bit(raw, p + 4, j) << 4)) + m
            out[b * 32 + j + 16] = d * np.float32((q >> 4) | (_qh_bit(raw, p + 4, j + 16) << 4)) + m


@njit(cache=True)
def dequant_iq4_nl(raw, off, n, out):
    """Blocks of 18 bytes: d (f16), 16 bytes of nibbles indexing IQ4_LEVELS; value = d level."""
    for b in range(n // 32):
        p = off + b * 18
        d = load_f16(raw, p)
        for j in range(16):
            q = raw[p + 2 + j]
            out[b * 32 + j] = d * IQ4_LEVELS[q & 15]
            out[b * 32 + j + 16] = d * IQ4_LEVELS[q >> 4]


@njit(cache=True)
def dequant_iq4_xs(raw, off, n, out):
    """Super-blocks of 136 bytes: d (f16), scales_h (u16: 2 high bits per sub-block), scales_l (4 bytes: a nibble
    per sub-block), then 8 sub-blocks of 16 nibble bytes as IQ4_NL's; value = d (scale - 32) level."""
    for b in range(n // 256):
        p = off + b * 136
        d = load_f16(raw, p)
        sh = np.int32(raw[p + 2]) | (np.int32(raw[p + 3]) << 8)
        for ib in range(8):
            ls = ((np.int32(raw[p + 4 + ib // 2]) >> (4 * (ib % 2))) & 15) | (((sh >> (2 * ib)) & 3) << 4)
            dl = d * np.float32(ls - 32)
            q0, o = p + 8 + 16 * ib, b * 256 + 32 * ib
            for j in range(16):
                q = raw[q0 + j]
                out[o + j] = dl * IQ4_LEVELS[q & 15]
                out[o + j + 16] = dl * IQ4_LEVELS[q >> 4]


@njit(cache=True)
def dequant_q2_k(raw, off, n, out):
    """Super-blocks of 84 bytes: 16 scale bytes (low nibble scale, high nibble min, one per 16 values), 64 bytes of
    2-bit quants, d, dmin (f16). Value h 128 + s 32 + l (half h, shift s) is bits 2s of qs[32 h + l]; its scale byte
    is the value's index // 16; value = d scale q - dmin min."""
    for b in range(n // 256):
        p = off + b * 84
        d, dmin = load_f16(raw, p + 80), load_f16(raw, p + 82)
        for h in range(2):
            for s in range(4):
                for half in range(2):
                    v0 = 128 * h + 32 * s + 16 * half
                    sc = np.int32(raw[p + v0 // 16])
                    dl, ml = d * np.float32(sc & 15), dmin * np.float32(sc >> 4)
                    for l in range(16):
                        q = (np.int32(raw[p + 16 + 32 * h + 16 * half + l]) >> (2 * s)) & 3
                        out[b * 256 + v0 + l] = dl * np.float32(q) - ml


@njit(cache=True)
def dequant_q3_k(raw, off, n, out):
    """Super-blocks of 110 bytes: hmask (32 bytes: bit 4h + s of byte l is value h 128 + s 32 + l's high bit), 64 bytes
    of 2-bit quants (as Q2_K's), 12 bytes of 6-bit scales, d (f16). Scale j: low 4 bits from byte j % 8 (nibble
    j // 8), high 2 from byte 8 + j % 4 (bits 2 (j // 4)); value = d (scale - 32) (q - (0 if high bit else 4))."""
    for b in range(n // 256):
        p = off + b * 110
        d = load_f16(raw, p + 108)
        sc = p + 96
        for h in range(2):
            for s in range(4):
                for half in range(2):
                    v0 = 128 * h + 32 * s + 16 * half
                    j = v0 // 16
                    lo = (np.int32(raw[sc + j % 8]) >> (4 * (j // 8))) & 15
                    hi = (np.int32(raw[sc + 8 + j % 4]) >> (2 * (j // 4))) & 3
                    dl = d * np.float32((lo | (hi << 4)) - 32)
                    for l in range(16):
                        i = 16 * half + l
                        q = (np.int32(raw[p + 32 + 32 * h + i]) >> (2 * s)) & 3
                        m = (np.int32(raw[p + i]) >> (4 * h + s)) & 1
                        out[b * 256 + v0 + l] = dl * np.float32(q - (0 if m else 4))
