"""The K-quants repacked at load for the integer dots (simd/krepacked.py): Q4_K -> Q4_KR, Q5_K -> Q5_KR,
Q6_K -> Q6_KR, Q3_K -> Q3_KR, Q2_K -> Q2_KR, the same bytes per super-block, only their order changed, so row offsets, row subsets and a stack's row_bytes hold as in
the file. A super-block's 256 values are 8 sub-blocks of 32; the repacked quants lie as repacked Q4_0's groups do:
chunk j (32 bytes) holds at byte 4 k + m sub-block k's values 8 j + m (low nibble) and 8 j + 4 + m (high).

Q4_KR (144 bytes): Q4_K's first 16 bytes as they are (d, dmin, 6-bit scales and mins), then the 4 chunks.
Q5_KR (176 bytes): Q4_KR's 144 bytes of the values' low 4 bits, then 32 bytes of their fifth bits: bit 2 j of byte L
that of chunk j's low nibble at byte L, bit 2 j + 1 that of its high nibble.
Q6_KR (210 bytes): d (fp16), the 16 int8 scales, the 4 chunks of the values' low 4 bits, then two runs of 32 bytes
of their high 2 bits: bits 2 s of byte 4 k + m of run h belong to sub-block k's value 4 (4 h + s) + m.
Q3_KR (110 bytes): d (fp16), Q3_K's 12 bytes of 6-bit scales as they are, two runs of 32 bytes of the values' low 2
bits (bits 2 s of byte 4 k + m of run c: sub-block k's value 4 (4 c + s) + m, as Q6_KR's high bits), then 32 bytes
of their third bits (bit i of byte 4 k + m: sub-block k's value 4 i + m).
Q2_KR (84 bytes): d, dmin (fp16), Q2_K's 16 scale bytes as they are, then the two runs of 2-bit values (as Q3_KR's).
IQ4_XSR (136 bytes): IQ4_XS's first 8 bytes as they are (d, the scales' high and low bits), then its nibbles in Q4_KR's 4
chunks (IQ4_XS is Q4_K's geometry with its own scales and ggml's 16 non-linear levels).
"""
import numpy as np
from numba import njit, prange

from .dequant import IQ4_LEVELS
from .simd import load_f16


@njit(cache=True, inline="always")
def _repack_q45_k(raw, rows, row_bytes, out, five):
    """Q4_K rows -> Q4_KR, or Q5_K -> Q5_KR (five: the nibbles sit where Q4_K's do, 32 bytes later, and the fifth bits
    of chunk j's low and high nibble at byte L go to bits 2 j and 2 j + 1 of byte 144 + L); module docstring."""
    size, qs = (176, 32) if five else (144, 0)
    u = np.uint64  # unsigned indices: numba's check for negative ones cost several times the work here
    for r in prange(rows):
        for s in range(row_bytes // size):
            p = u(r * row_bytes + size * s)
            for i in range(16):
                out[p + u(i)] = raw[p + u(i)]
            for k in range(8):  # sub-block k: the low (even k) or high nibbles of 32 bytes from 16 + qs + 32 (k // 2)
                src, sh = p + u(16 + qs + 32 * (k // 2)), 4 * (k % 2)
                for m in range(4):
                    at, f = u(4 * k + m), 0
                    for j in range(4):
                        lo, hi = u(8 * j + m), u(8 * j + 4 + m)
                        out[p + u(16 + 32 * j) + at] = ((raw[src + lo] >> sh) & 15) | (((raw[src + hi] >> sh) & 15) << 4)
                        if five:  # the fifth bits: bit k of qh bytes lo and hi
                            f |= (((raw[p + u(16) + lo] >> k) & 1) << (2 * j)) | (((raw[p + u(16) + hi] >> k) & 1) << (2 * j + 1))
                    if five:
                        out[p + u(144) + at] = f


@njit(parallel=True, cache=True)
def repack_q4_k(raw, rows, row_bytes, out):
    _repack_q45_k(raw, rows, row_bytes, out, False)


@njit(parallel=True, cache=True)
def repack_q5_k(raw, rows, row_bytes, out):
    _repack_q45_k(raw, rows, row_bytes, out, True)


@njit(parallel=True, cache=True)
def repack_q6_k(raw, rows, row_bytes, out):
    """Q6_K rows -> Q6_KR (module docstring), row by row."""
    u = np.uint64  # unsigned indices (see _repack_q45_k)
    for r in prange(rows):
        for s in range(row_bytes // 210):
            p = u(r * row_bytes + 210 * s)
            for i in range(2):
                out[p + u(i)] = raw[p + u(208 + i)]
            for i in range(16):
                out[p + u(2 + i)] = raw[p + u(192 + i)]
            for k in range(8):  # sub-block k = 4 h + k2 (ggml's dequantize_row_q6_K): value l's low 4 bits in byte
                h, k2 = k // 4, k % 4  # 64 h + 32 (k2 % 2) + l, nibble k2 // 2; its high 2 in 128 + 32 h + l, bits 2 k2
                lsrc, lsh = p + u(64 * h + 32 * (k2 % 2)), 4 * (k2 // 2)
                hsrc, hsh = p + u(128 + 32 * h), 2 * k2
                for m in range(4):
                    for c in range(4):  # value runs 2 c and 2 c + 1: one byte of low nibbles
                        a = (raw[lsrc + u(8 * c + m)] >> lsh) & 15
                        b = (raw[lsrc + u(8 * c + 4 + m)] >> lsh) & 15
                        out[p + u(18 + 32 * c + 4 * k + m)] = a | (b << 4)
                    for c in range(2):  # value runs 4 c .. 4 c + 3: one byte of high bits
                        v = 0
                        for i in range(4):
                            v |= ((raw[hsrc + u(4 * (4 * c + i) + m)] >> hsh) & 3) << (2 * i)
                        out[p + u(146 + 32 * c + 4 * k + m)] = v


@njit(cache=True, inline="always")
def _two_bit_runs(raw, qs, out, at):
    """Q2_K / Q3_K's 64 bytes of 2-bit quants at raw[qs:] (value 128 h + 32 s + l: bits 2 s of byte 32 h + l) ->
    the two lane-ordered runs at out[at:] (module docstring)."""
    u = np.uint64  # (unsigned indices: see _repack_q45_k)
    for k in range(8):
        src, sh = qs + u(32 * (k // 4)), 2 * (k % 4)
        for c in range(2):
            for m in range(4):
                b = 0
                for s in range(4):  # sub-block k's value l = 4 (4 c + s) + m: value 32 k + l of the super-block
                    b |= ((raw[src + u(4 * (4 * c + s) + m)] >> sh) & 3) << (2 * s)
                out[at + u(32 * c + 4 * k + m)] = b


@njit(parallel=True, cache=True)
def repack_q3_k(raw, rows, row_bytes, out):
    """Q3_K rows (hmask 32 bytes, 2-bit quants 64, scales 12, d) -> Q3_KR (module docstring)."""
    u = np.uint64
    for r in prange(rows):
        for sb in range(row_bytes // 110):
            p = u(r * row_bytes + 110 * sb)
            for i in range(2):
                out[p + u(i)] = raw[p + u(108 + i)]
            for i in range(12):
                out[p + u(2 + i)] = raw[p + u(96 + i)]
            _two_bit_runs(raw, p + u(32), out, p + u(14))
            for k in range(8):  # value 32 k + l's third bit: bit k of hmask byte l (k = 4 h + s)
                for m in range(4):
                    b = 0
                    for i in range(8):
                        b |= ((raw[p + u(4 * i + m)] >> k) & 1) << i
                    out[p + u(78 + 4 * k + m)] = b


@njit(parallel=True, cache=True)
def repack_q2_k(raw, rows, row_bytes, out):
    """Q2_K rows (scales 16 bytes, 2-bit quants 64, d, dmin) -> Q2_KR (module docstring)."""
    u = np.uint64
    for r in prange(rows):
        for sb in range(row_bytes // 84):
            p = u(r * row_bytes + 84 * sb)
            for i in range(4):
                out[p + u(i)] = raw[p + u(80 + i)]
            for i in range(16):
                out[p + u(4 + i)] = raw[p + u(i)]
            _two_bit_runs(raw, p + u(16), out, p + u(20))


@njit(cache=True, inline="always")
def lane_nibbles(raw, q, out, o):
    """The 32 nibbles of 16 bytes at raw[q:] (value l: byte l % 16, low nibble for l < 16; Q4_0's and IQ4's order) into
    lane k of 4 chunks of 32 bytes from out[o - 4 k:] (o: chunk 0's byte 4 k): chunk j's bytes o + 32 j + m hold values
    8 j + m (low nibble) and 8 j + 4 + m (high), m < 4. Per source byte quad, branch-free; q and o unsigned (see
    _repack_q45_k)."""
    u = np.uint64
    for i in range(4):
        mm = u(i)
        w0, w1, w2, w3 = raw[q + mm], raw[q + u(4) + mm], raw[q + u(8) + mm], raw[q + u(12) + mm]
        out[o + mm] = (w0 & 15) | ((w1 & 15) << 4)
        out[o + u(32) + mm] = (w2 & 15) | ((w3 & 15) << 4)
        out[o + u(64) + mm] = (w0 >> 4) | (w1 & 240)
        out[o + u(96) + mm] = (w2 >> 4) | (w3 & 240)


@njit(parallel=True, cache=True)
def repack_iq4_xs(raw, rows, row_bytes, out):
    """IQ4_XS rows (d, scales_h, scales_l, then 8 sub-blocks of 16 nibble bytes in Q4_0's order) -> IQ4_XSR."""
    u = np.uint64
    for r in prange(rows):
        for s in range(row_bytes // 136):
            p = u(r * row_bytes + 136 * s)
            for i in range(8):
                out[p + u(i)] = raw[p + u(i)]
            for k in range(8):
                lane_nibbles(raw, p + u(8 + 16 * k), out, p + u(8 + 4 * k))


@njit(cache=True, inline="always")
def dequant_iq4_xsr(raw, off, n, out):
    """The n values of the IQ4_XSR row at raw[off:] as float32 (value = d (ls_k - 32) levels[q], as IQ4_XS's)."""
    for s in range(n // 256):
        p = off + 136 * s
        d = load_f16(raw, p)
        sh = np.int32(raw[p + 2]) | (np.int32(raw[p + 3]) << 8)
        for k in range(8):
            ls = ((np.int32(raw[p + 4 + k // 2]) >> (4 * (k % 2))) & 15) | (((sh >> (2 * k)) & 3) << 4)
            dl = d * np.float32(ls - 32)
            for j in range(4):
                for m in range(4):
                    q = np.int32(raw[p + 8 + 32 * j + 4 * k + m])
                    out[256 * s + 32 * k + 8 * j + m] = dl * IQ4_LEVELS[q & 15]
                    out[256 * s + 32 * k + 8 * j + 4 + m] = dl * IQ4_LEVELS[q >> 4]


@njit(cache=True, inline="always")
def _two_bits(raw, p, k, l):
    """Sub-block k's value l (0..31) from Q3_KR / Q2_KR's runs of 2-bit values at raw[p:]."""
    i, m = l // 4, l % 4
    return (np.int32(raw[p + 32 * (i // 4) + 4 * k + m]) >> (2 * (i % 4))) & 3


@njit(cache=True, inline="always")
def dequant_q3_kr(raw, off, n, out):
    """The n values of the Q3_KR row at raw[off:] as float32 (value = d (sc - 32) (q - 4), q the 3-bit quant, as
    Q3_K's with its high bit inverted: set means no - 4 in ggml's terms)."""
    for s in range(n // 256):
        p = off + 110 * s
        d = load_f16(raw, p)
        for j in range(16):  # scale j: low 4 bits from byte j % 8 (nibble j // 8), high 2 from byte 8 + j % 4
            lo = (np.int32(raw[p + 2 + j % 8]) >> (4 * (j // 8))) & 15
            hi = (np.int32(raw[p + 10 + j % 4]) >> (2 * (j // 4))) & 3
            dl = d * np.float32((lo | (hi << 4)) - 32)
            k = j // 2
            for l in range(16 * (j % 2), 16 * (j % 2) + 16):
                q = _two_bits(raw, p + 14, k, l) | (((np.int32(raw[p + 78 + 4 * k + l % 4]) >> (l // 4)) & 1) << 2)
                out[256 * s + 32 * k + l] = dl * np.float32(q - 4)


@njit(cache=True, inline="always")
def dequant_q2_kr(raw, off, n, out):
    """The n values of the Q2_KR row at raw[off:] as float32 (value = d sc q - dmin m per 16 values, as Q2_K's)."""
    for s in range(n // 256):
        p = off + 84 * s
        d, dmin = load_f16(raw, p), load_f16(raw, p + 2)
        for j in range(16):
            sc = np.int32(raw[p + 4 + j])
            dl, ml = d * np.float32(sc & 15), dmin * np.float32(sc >> 4)
            k = j // 2
            for l in range(16 * (j % 2), 16 * (j % 2) + 16):
                out[256 * s + 32 * k + l] = dl * np.float32(_two_bits(raw, p + 20, k, l)) - ml


@njit(cache=True, inline="always")
def k_scale_min(raw, sc, j):
    """6-bit scale and min of sub-block j from the 12 packed bytes at raw[sc:] (Q4_K / Q5_K and their repacks)."""
    if j < 4:
        return np.int32(raw[sc + j]) & 63, np.int32(raw[sc + j + 4]) & 63
    s = (np.int32(raw[sc + j + 4]) & 15) | ((np.int32(raw[sc + j - 4]) >> 6) << 4)
    m = (np.int32(raw[sc + j + 4]) >> 4) | ((np.int32(raw[sc + j]) >> 6) << 4)
    return s, m


@njit(cache=True, inline="always")
def _dequant_q45_kr(raw, off, n, out, five):
    """The n values of the Q4_KR (Q5_KR: five) row at raw[off:] as float32 (value = d sc_k q - dmin m_k)."""
    size = 176 if five else 144
    for s in range(n // 256):
        p = off + size * s
        d, dmin = load_f16(raw, p), load_f16(raw, p + 2)
        for k in range(8):
            sc, mn = k_scale_min(raw, p + 4, k)
            a, c = d * np.float32(sc), dmin * np.float32(mn)
            for j in range(4):
                for m in range(4):
                    q = np.int32(raw[p + 16 + 32 * j + 4 * k + m])
                    lo, hi = q & 15, q >> 4
                    if five:
                        f = np.int32(raw[p + 144 + 4 * k + m])
                        lo |= ((f >> (2 * j)) & 1) << 4
                        hi |= ((f >> (2 * j + 1)) & 1) << 4
                    out[256 * s + 32 * k + 8 * j + m] = a * np.float32(lo) - c
                    out[256 * s + 32 * k + 8 * j + 4 + m] = a * np.float32(hi) - c


@njit(cache=True, inline="always")
def dequant_q4_kr(raw, off, n, out):
    _dequant_q45_kr(raw, off, n, out, False)


@njit(cache=True, inline="always")
def dequant_q5_kr(raw, off, n, out):
    _dequant_q45_kr(raw, off, n, out, True)


@njit(cache=True, inline="always")
def dequant_q6_kr(raw, off, n, out):
    """The n values of the Q6_KR row at raw[off:] as float32 (value = d sc (q - 32), as Q6_K's)."""
    for s in range(n // 256):
        p = off + 210 * s
        d = load_f16(raw, p)
        for k in range(8):
            for i in range(8):
                sc = d * np.float32(np.int8(raw[p + 2 + 2 * k + i // 4]))
                for m in range(4):
                    lo = np.int32(raw[p + 18 + 32 * (i // 2) + 4 * k + m])
                    lo = (lo & 15) if i % 2 == 0 else (lo >> 4)
                    hi = (np.int32(raw[p + 146 + 32 * (i // 4) + 4 * k + m]) >> (2 * (i % 4))) & 3
                    out[256 * s + 32 * k + 4 * i + m] = sc * np.float32(np.int32(lo | (hi << 4)) - 32)
