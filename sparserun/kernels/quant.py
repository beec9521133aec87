"""numba kernels for GGUF weight types: row dequantization and (batched) matrix-vector products.

Weights stay in the GGUF file's own block layout, read in place from the memory map (no copy, so RSS
stays near the file size), or in a repacked copy of the same bytes (below). Every kernel addresses a tensor as (raw uint8 bytes, row_bytes): row r
starts at byte r * row_bytes. Shapes and offsets are validated in Python before these run.

Two matmul routes:
- Integer dots: activations are rounded to int8 per 32-block (Q8_K per 256 for the K-quants, as llama.cpp does)
  and each block dot is an integer SIMD intrinsic (kernels.simd): vpdpbusd on AVX512-VNNI CPUs, the same sums in
  generic vector IR elsewhere, for every quantized type (Q4_0 and the K-quants repacked at load into layouts made
  for the dot: repack_q4_0, kernels.krepack).
- F32, F16 and BF16 rows are converted in L1 and dotted as floats (matmul_f32 / matmul_dequant).
"""
import numpy as np
from numba import njit, prange

from .simd import (HAS_X86_VNNI, Q4_0R_GROUP, TOKENS, TOKENS_K, f32_bits, f32_from_bits, dot_row_q4_0_generic, dot_tokens_q4_0_generic, dot_row_q4_0_vnni, dot_row_q4_0r_vnni, dot_row_q4_0r_generic, dot_tokens_q4_0r_generic,
                   dot_row_q4_k_vnni, dot_row_q5_0_generic, dot_tokens_q5_0_generic, dot_row_q5_0_vnni, dot_row_q5_k_vnni, dot_row_q6_k_vnni,
                   dot_row_q8_0, dot_row_q8_0_vnni, dot_row_q8_0_generic, dot_tokens_q8_0_generic, X86_AVX2, dot_tokens_q4_0r_vnni, dot_tokens_q4_k_vnni, dot_tokens_q5_0_vnni,
                   dot_tokens_q5_k_vnni, dot_tokens_q6_k_vnni, dot_tokens_q8_0_vnni, load_bf16, load_f16, load_f32,
                   round_f16, dot_row_q4_k_generic, dot_row_q5_k_generic, dot_row_q6_k_generic,
                   dot_tokens_q4_k_generic, dot_tokens_q5_k_generic, dot_tokens_q6_k_generic, dot_row_q4_1_vnni,
                   dot_row_q5_1_vnni, dot_tokens_q4_1_vnni, dot_tokens_q5_1_vnni, dot_row_q4_1_generic,
                   dot_row_q5_1_generic, dot_tokens_q4_1_generic, dot_tokens_q5_1_generic, dot_row_q2_k_vnni,
                   dot_row_q3_k_vnni, dot_tokens_q2_k_vnni, dot_tokens_q3_k_vnni, dot_row_q2_k_generic,
                   dot_row_q3_k_generic, dot_tokens_q2_k_generic, dot_tokens_q3_k_generic, dot_row_iq4_nl_vnni,
                   dot_tokens_iq4_nl_vnni, dot_row_iq4_nl_generic, dot_tokens_iq4_nl_generic, dot_row_iq4_xs_vnni,
                   dot_tokens_iq4_xs_vnni, dot_row_iq4_xs_generic, dot_tokens_iq4_xs_generic, dot_row_q4_kr_vnni,
                   dot_row_q4_kr_generic, dot_row_q5_kr_vnni, dot_row_q5_kr_generic, dot_row_q6_kr_vnni,
                   dot_row_q6_kr_generic, dot_row_q4_krk_vnni, dot_tokens_q4_krk_vnni, dot_row_q4_krk_generic,
                   dot_tokens_q4_krk_generic, dot_row_q5_krk_vnni, dot_tokens_q5_krk_vnni, dot_row_q5_krk_generic,
                   dot_tokens_q5_krk_generic, dot_row_q6_krk_vnni, dot_tokens_q6_krk_vnni, dot_row_q6_krk_generic,
                   dot_tokens_q6_krk_generic, dot_row_q3_kr_vnni, dot_row_q3_kr_generic, dot_row_q2_kr_vnni,
                   dot_row_q2_kr_generic, dot_row_q3_krk_vnni, dot_tokens_q3_krk_vnni, dot_row_q3_krk_generic,
                   dot_tokens_q3_krk_generic, dot_row_q2_krk_vnni, dot_tokens_q2_krk_vnni, dot_row_q2_krk_generic,
                   dot_tokens_q2_krk_generic, dot_row_iq4_xsr_vnni, dot_row_iq4_xsr_generic, dot_row_iq4_xsrk_vnni,
                   dot_tokens_iq4_xsrk_vnni, dot_row_iq4_xsrk_generic, dot_tokens_iq4_xsrk_generic, dot_row_iq4_nlr_vnni,
                   dot_tokens_iq4_nlr_vnni, dot_row_iq4_nlr_generic, dot_tokens_iq4_nlr_generic, prefetch)

# ggml type ids (sparserun.qtypes, the one table of types), plain ints so numba can branch on them
from ..qtypes import (BF16, BLOCKS, F16, F32, IQ4_NL, IQ4_NLR, IQ4_XS, IQ4_XSR, Q2_K, Q2_KR, Q3_K, Q3_KR, Q4_0, Q4_0R, Q4_1, Q4_K,  # noqa: E402
                      Q4_KR, Q5_0, Q5_1, Q5_K, Q5_KR, Q6_K, Q6_KR, Q8_0)
from .templates import define  # noqa: E402
from .krepack import (dequant_iq4_xsr, dequant_q2_kr, dequant_q3_kr, dequant_q4_kr, dequant_q5_kr, dequant_q6_kr,  # noqa: E402
                      k_scale_min, lane_nibbles)
KR_TYPES = (Q4_KR, Q5_KR, Q6_KR, Q3_KR, Q2_KR, IQ4_XSR)  # the 256-value types repacked at load (krepack.py)
from .dequant import (IQ4_LEVELS, dequant_iq4_nl, dequant_iq4_xs, dequant_q2_k, dequant_q3_k, dequant_q4_1,  # noqa: E402
                      dequant_q5_0, dequant_q5_1)
Q4_0_LEVELS = np.arange(-8, 8).astype(np.float32)  # a Q4_0 nibble's value, as IQ4_LEVELS gives IQ4_NL's

QK = 32  # block size of Q4_0 / Q8_0 and of the int8 activation blocks
QK_K = 256  # super-block size of the K-quants


@njit(cache=True)
def dequant_row(raw, off, qtype, n, out):
    """Dequantize the n values of type qtype stored at raw[off:] into out[:n] (float32)."""
    if qtype == F32:
        for i in range(n):
            out[i] = load_f32(raw, off + 4 * i)
    elif qtype == F16:
        for i in range(n):
            out[i] = load_f16(raw, off + 2 * i)
    elif qtype == BF16:
        for i in range(n):
            out[i] = load_bf16(raw, off + 2 * i)
    elif qtype == Q4_0:
        for b in range(n // 32):
            p = off + b * 18
            d = load_f16(raw, p)
            for j in range(16):
                q = raw[p + 2 + j]
                out[b * 32 + j] = d * np.float32((q & 15) - 8)
                out[b * 32 + j + 16] = d * np.float32((q >> 4) - 8)
    elif qtype == Q4_0R or qtype == IQ4_NLR:  # (IQ4_NL in Q4_0R's layout: each nibble a level)
        nb = n // 32
        lv = IQ4_LEVELS if qtype == IQ4_NLR else Q4_0_LEVELS
        for b in range(nb):
            g, k = b // Q4_0R_GROUP, b % Q4_0R_GROUP
            m = min(Q4_0R_GROUP, nb - g * Q4_0R_GROUP)
            p = off + g * 18 * Q4_0R_GROUP
            d = load_f16(raw, p + 2 * k)
            if m < Q4_0R_GROUP:  # the shorter run: Q4_0's byte order
                for j in range(16):
                    q = raw[p + 2 * m + 16 * k + j]
                    out[b * 32 + j] = d * lv[q & 15]
                    out[b * 32 + j + 16] = d * lv[q >> 4]
                continue
            for j in range(4):  # repack_q4_0's lanes: weights 8 j + mm (low nibble) and 8 j + 4 + mm (high)
                for mm in range(4):
                    q = raw[p + 2 * m + 32 * j + 4 * k + mm]
                    out[b * 32 + 8 * j + mm] = d * lv[q & 15]
                    out[b * 32 + 8 * j + 4 + mm] = d * lv[q >> 4]
    elif qtype == Q8_0:
        for b in range(n // 32):
            p = off + b * 34
            d = load_f16(raw, p)
            for j in range(32):
                q = np.int32(raw[p + 2 + j])
                out[b * 32 + j] = d * np.float32(q - 256 if q > 127 else q)
    elif qtype == Q4_K:
        _dequant_q4_k(raw, off, n, out)
    elif qtype == Q4_KR:
        dequant_q4_kr(raw, off, n, out)
    elif qtype == Q5_KR:
        dequant_q5_kr(raw, off, n, out)
    elif qtype == Q6_KR:
        dequant_q6_kr(raw, off, n, out)
    elif qtype == Q3_KR:
        dequant_q3_kr(raw, off, n, out)
    elif qtype == Q2_KR:
        dequant_q2_kr(raw, off, n, out)
    elif qtype == IQ4_XSR:
        dequant_iq4_xsr(raw, off, n, out)
    elif qtype == Q5_K:
        _dequant_q5_k(raw, off, n, out)
    elif qtype == Q6_K:
        _dequant_q6_k(raw, off, n, out)
    elif qtype == Q5_0:
        dequant_q5_0(raw, off, n, out)
    elif qtype == Q4_1:
        dequant_q4_1(raw, off, n, out)
    elif qtype == Q5_1:
        dequant_q5_1(raw, off, n, out)
    elif qtype == IQ4_NL:
        dequant_iq4_nl(raw, off, n, out)
    elif qtype == IQ4_XS:
        dequant_iq4_xs(raw, off, n, out)
    elif qtype == Q3_K:
        dequant_q3_k(raw, off, n, out)
    elif qtype == Q2_K:
        dequant_q2_k(raw, off, n, out)


# The K-quant dequantizers run in flat loops of 32 (or 16) values with every scale and shift fixed, so that
# LLVM vectorizes them: a decode token dequantizes every K-quant row it reads (matmul_dequant). Written with a
# per-value shift, scale index and type branch, they ran scalar: TinyLlama Q4_K_M decoded at 1.51 t/s, then 2.92
# (A/B in one process; Q6_K alone 1.1 -> 5.3 G values/s on one core). On VNNI CPUs Q4_K and Q6_K rows are now
# dotted in integers instead (simd.dot_row_q4_k_vnni / q5_k / q6_k: 29.5 t/s); other CPUs still come here.


@njit(cache=True, inline="always")
def _k_pair_scales(raw, p, i):
    """(scale, min) of sub-blocks 2i and 2i + 1 of the Q4_K / Q5_K super-block at raw[p:], as floats: value =
    scale q - min."""
    d, dmin = load_f16(raw, p), load_f16(raw, p + 2)
    s0, m0 = k_scale_min(raw, p + 4, 2 * i)
    s1, m1 = k_scale_min(raw, p + 4, 2 * i + 1)
    return d * np.float32(s0), dmin * np.float32(m0), d * np.float32(s1), dmin * np.float32(m1)


@njit(cache=True, inline="always")
def _dequant_q4_k(raw, off, n, out):
    """Q4_K super-blocks (144 bytes: d, dmin, 12 bytes of 6-bit scales and mins, 128 bytes of nibbles): the
    32 bytes of sub-block pair i hold sub-block 2i in their low nibbles and 2i + 1 in their high ones."""
    for b in range(n // QK_K):
        p = off + b * 144
        for i in range(4):
            d0, c0, d1, c1 = _k_pair_scales(raw, p, i)
            q, o = p + 16 + 32 * i, b * QK_K + 64 * i
            for l in range(32):
                v = raw[q + l]
                out[o + l] = d0 * np.float32(v & 15) - c0
                out[o + 32 + l] = d1 * np.float32(v >> 4) - c1


@njit(cache=True, inline="always")
def _dequant_q5_k(raw, off, n, out):
    """Q5_K super-blocks (176 bytes): Q4_K's fields, then 32 bytes qh (bit j of byte l: the 5th bit of sub-block
    j's value l) before the nibbles."""
    for b in range(n // QK_K):
        p = off + b * 176
        for i in range(4):
            d0, c0, d1, c1 = _k_pair_scales(raw, p, i)
            q, o = p + 48 + 32 * i, b * QK_K + 64 * i
            for l in range(32):
                v, h = raw[q + l], raw[p + 16 + l] >> (2 * i)
                out[o + l] = d0 * np.float32((v & 15) | ((h & 1) << 4)) - c0
                out[o + 32 + l] = d1 * np.float32((v >> 4) | ((h & 2) << 3)) - c1


@njit(cache=True, inline="always")
def _dequant_q6_k(raw, off, n, out):
    """Q6_K super-blocks (210 bytes: 128 bytes of low nibbles ql, 64 of 2-bit highs qh, 16 int8 scales, d), in
    two halves of 128 values: value l + 32 k of a half (k < 4) takes its low 4 bits from ql[64 h + l + 32 (k % 2)]
    (low nibble for k < 2, else high), its high 2 from bits 2k of qh[32 h + l], its scale from
    sc[8 h + 2 k + l // 16]; value = d * scale * (q - 32)."""
    for b in range(n // QK_K):
        p = off + b * 210
        d = load_f16(raw, p + 208)
        for h in range(2):
            ql, qh, sc, o = p + 64 * h, p + 128 + 32 * h, p + 192 + 8 * h, b * QK_K + 128 * h
            for half in range(2):  # the 4 values l + 32 k from 3 bytes, constant shifts (a variable one: scalar)
                s0, s1 = d * np.float32(np.int8(raw[sc + half])), d * np.float32(np.int8(raw[sc + 2 + half]))
                s2, s3 = d * np.float32(np.int8(raw[sc + 4 + half])), d * np.float32(np.int8(raw[sc + 6 + half]))
                for l in range(16 * half, 16 * half + 16):
                    a, c, e = np.int32(raw[ql + l]), np.int32(raw[ql + 32 + l]), np.int32(raw[qh + l])
                    out[o + l] = s0 * np.float32(((a & 15) | ((e & 3) << 4)) - 32)
                    out[o + 32 + l] = s1 * np.float32(((c & 15) | ((e & 12) << 2)) - 32)
                    out[o + 64 + l] = s2 * np.float32(((a >> 4) | (e & 48)) - 32)
                    out[o + 96 + l] = s3 * np.float32(((c >> 4) | ((e & 192) >> 2)) - 32)


@njit(cache=True, fastmath={"nnan", "ninf", "nsz"}, error_model="numpy")
def quantize_acts(x, xq, xd, x8, xb, xt, xs):
    """Round activations x (T, n) to int8 blocks of 32, in every form a row dot reads, in one pass:
    xq (T, n) int16 holding the int8 values (widened once here rather than in every row's dot product),
    xd (T, n/32) float32 scales, x8 (T, n) the same values as int8 and xb (T, n/4) int32, -8 times the sum
    of each run of 4 values (a vpdpbusd lane's), which cancels Q4_0's +8 nibble offset in the VNNI kernels.
    The repacked Q4_0 dots (simd.dot_row_q4_0r_vnni) read x8 transposed within each whole group of
    Q4_0R_GROUP blocks, xt (T, n) int8: the group's run of 4 values i of block k at 4-byte slot 8 i + k (the
    rest of a row as in x8), and xs (T, n/32) int32, -8 times each block's sum.

    Mirrors llama.cpp's quantize_row_q8_0: scale = amax/127 kept at fp16 precision, values rounded to
    nearest (ties to even, as its AVX path does: np.rint, an LLVM intrinsic that no fastmath flag can rewrite;
    this kernel is also compiled inside fastmath callers, where an add-and-subtract rounding trick was folded away).
    Its own flags allow no NaN/inf and ignore the sign of zero only, which lets the amax loop vectorize (3.1 -> 2.2 us
    for 2048 values) and leaves every product and rounding as written (bit-identical to the strict build on 600
    random rows, ties included).
    """
    T, n = x.shape
    G = QK * Q4_0R_GROUP  # values in a repacked Q4_0 group
    for t in range(T):
        for b in range(n // QK):
            o = b * QK
            amax = np.float32(0.0)
            for j in range(QK):
                amax = max(amax, abs(x[t, o + j]))
            d = amax / np.float32(127.0)
            inv = np.float32(1.0) / d if d > 0 else np.float32(0.0)
            xd[t, b] = round_f16(d)
            for j in range(QK):
                v = np.int32(np.rint(x[t, o + j] * inv))  # |v| <= 127
                xq[t, o + j] = v
                x8[t, o + j] = v
            s = 0
            for l in range(QK // 4):
                k = o + 4 * l
                xb[t, b * 8 + l] = -8 * (np.int32(x8[t, k]) + np.int32(x8[t, k + 1]) + np.int32(x8[t, k + 2]) +
                                         np.int32(x8[t, k + 3]))
                s += xb[t, b * 8 + l]
            xs[t, b] = s
        x32, t32 = x8[t].view(np.int32), xt[t].view(np.int32)  # runs of 4 values
        for g in range(n // G):
            for i in range(QK // 4):
                for k in range(Q4_0R_GROUP):
                    t32[g * G // 4 + 8 * i + k] = x32[g * G // 4 + 8 * k + i]
        for j in range(n // G * G, n):
            xt[t, j] = x8[t, j]


@njit(cache=True)
def acts_forms(x, needed=True):
    """quantize_acts' six forms of x (T, n), allocated here (the one place their shapes are written), computed
    when needed, else empty arrays of the same types."""
    T, n = x.shape
    if not needed:
        T = n = 0
    forms = (np.empty((T, n), np.int16), np.empty((T, n // QK), np.float32), np.empty((T, n), np.int8),
             np.empty((T, n // 4), np.int32), np.empty((T, n), np.int8), np.empty((T, n // QK), np.int32))
    if needed and T > 1:
        _quantize_acts_tokens(x, *forms)
    elif needed:
        quantize_acts(x, *forms)
    return forms


@njit(parallel=True, cache=True)
def _quantize_acts_tokens(x, xq, xd, x8, xb, xt, xs):
    """quantize_acts over a batch, tokens split over the threads (one token stays serial: a parallel region costs
    more than its rounding)."""
    for t in prange(x.shape[0]):
        quantize_acts(x[t:t + 1], xq[t:t + 1], xd[t:t + 1], x8[t:t + 1], xb[t:t + 1], xt[t:t + 1], xs[t:t + 1])


@njit(cache=True, fastmath={"nnan", "ninf", "nsz"}, error_model="numpy")
def quantize_acts_k(x, x8, xd, xb, xt, xs):
    """Round activations x (T, n) (n a multiple of 256) as llama.cpp's quantize_row_q8_K does for its K-quant dots:
    one float32 scale per 256 values, d = max / -127 with max the value of largest magnitude (the first one on a
    tie), values rint(x * -127 / max) capped at 127. Written in quantize_acts' VNNI forms (x8, xd per 32 values:
    the super-block's d repeated, xb from x8, and the repacked dots' xt and xs), so the K-quant dots sum exactly
    the integers llama.cpp sums. xs (T, 3 n/32) holds 24 terms per super-block: its 8 blocks' offset terms, those
    of each block's first 16 values (-8 x their sum), which the repacked Q6_K dots read, and the blocks' terms as
    float32 bits, which the repacked Q4_K / Q5_K dots read (simd.krepacked); a super-block's terms sit at three
    times its first block's index, so a column range's start follows from its xd index."""
    T, n = x.shape
    for t in range(T):
        xsf = xs[t].view(np.float32)
        for sb in range(n // QK_K):
            o = sb * QK_K
            # the value of largest magnitude, the first one on a tie: the magnitude as the largest of the values'
            # sign-cleared bits (an integer max reduction vectorizes; numba's float max did not), the sign that of
            # whichever of +amax and -amax occurs, and only where both do is the first one looked for
            m = np.int32(0)
            for j in range(QK_K):
                b = f32_bits(x[t, o + j]) & np.int32(0x7FFFFFFF)
                m = b if b > m else m
            amax = f32_from_bits(m)
            pos = neg = False
            for j in range(QK_K):
                pos |= x[t, o + j] == amax
                neg |= x[t, o + j] == -amax
            if pos and neg:
                j = 0
                while abs(x[t, o + j]) != amax:
                    j += 1
                mx = x[t, o + j]
            else:
                mx = amax if pos else -amax
            iscale = np.float32(-127.0) / mx if amax > 0 else np.float32(0.0)
            d = np.float32(1.0) / iscale if amax > 0 else np.float32(0.0)
            for j in range(QK_K):
                x8[t, o + j] = min(127, np.int32(np.rint(iscale * x[t, o + j])))
            for b in range(QK_K // QK):
                xd[t, o // QK + b] = d
            for l in range(QK_K // 4):
                k = o + 4 * l
                xb[t, o // 4 + l] = -8 * (np.int32(x8[t, k]) + np.int32(x8[t, k + 1]) + np.int32(x8[t, k + 2]) +
                                          np.int32(x8[t, k + 3]))
            for b in range(QK_K // QK):  # per super-block 24 terms: the 8 blocks', their first 16 values', and
                s = 0                      # the blocks' again as float32 bits
                for l in range(QK // 4):
                    s += xb[t, o // 4 + 8 * b + l]
                    if l == QK // 8 - 1:  # (Q6_K's scales are per 16)
                        xs[t, 3 * (o // QK) + 8 + b] = s
                xs[t, 3 * (o // QK) + b] = s
                xsf[3 * (o // QK) + 16 + b] = np.float32(s)
        x32, t32 = x8[t].view(np.int32), xt[t].view(np.int32)  # quantize_acts' transposition, 256 values a group
        for g in range(n // QK_K):
            for i in range(QK // 4):
                for k in range(Q4_0R_GROUP):
                    t32[g * QK_K // 4 + 8 * i + k] = x32[g * QK_K // 4 + 8 * k + i]


@njit(cache=True)
def acts_forms_k(x):
    """quantize_acts_k's forms of x (T, n) in acts_forms' six places (xq, which no K-quant dot reads, empty)."""
    T, n = x.shape
    forms = (np.empty((0, 0), np.int16), np.empty((T, n // QK), np.float32), np.empty((T, n), np.int8),
             np.empty((T, n // 4), np.int32), np.empty((T, n), np.int8), np.empty((T, 3 * (n // QK)), np.int32))
    if T > 1:
        _quantize_acts_k_tokens(x, forms[2], forms[1], forms[3], forms[4], forms[5])
    else:
        quantize_acts_k(x, forms[2], forms[1], forms[3], forms[4], forms[5])
    return forms


@njit(parallel=True, cache=True)
def _quantize_acts_k_tokens(x, x8, xd, xb, xt, xs):
    """quantize_acts_k over a batch, tokens split over the threads (as _quantize_acts_tokens)."""
    for t in prange(x.shape[0]):
        quantize_acts_k(x[t:t + 1], x8[t:t + 1], xd[t:t + 1], xb[t:t + 1], xt[t:t + 1], xs[t:t + 1])


HAS_VNNI = HAS_X86_VNNI  # AVX512-VNNI kernels in use (detected in simd; SPARSERUN_NO_VNNI=1 turns them off)


@njit(cache=True, inline="always")
def _part(row0, r):
    """The weight of a stack that holds output row r (row0: each weight's first output row, then the total)."""
    p = 0
    while r >= row0[p + 1]:
        p += 1
    return p


# A decode token reads each row once, in order: the matmuls prefetch the row starting at least PREFETCH_BYTES past
# the row being dotted (one row of 1-3 KB on TinyLlama). Random K-quant rows 2048 wide from DRAM, 2 threads, on an
# AVX2 CPU (Zen 3): Q4_K 19.8 -> 21.0-26.1 GB/s, Q5_K 18.9 -> 22.0-28.8, Q6_K 21.8 -> 25.4-27.5 (three runs; 1 to 16
# rows ahead measured alike); the hardware prefetcher alone lets each thread's stream stall. Rows dotted in column
# ranges (wider than K_COLUMNS blocks: ffn_down) prefetch the next row range by range: a whole 4.6 KB Q6_K row at
# once (73 lines) ran 5632-wide rows at 21.3 GB/s against 28.7 for 2048-wide ones; range by range 26.6-31.4.
PREFETCH_BYTES = 1024


@njit(cache=True, inline="always")
def _prefetch_row(raws, row_bytes, row0, r, ahead, off, nbytes):
    """Prefetch bytes [off, off + nbytes) of row r + ahead of the stack (nothing past its last row)."""
    q = r + ahead
    if q < row0[-1]:
        p = _part(row0, q)
        prefetch(raws[p], (q - row0[p]) * row_bytes + off, nbytes)


# The matmul kernels take a stack of weights of one type and width: raws, a tuple of their bytes, and row0
# (above). One call computes q, k and v (or gate and up) over their rows together: one parallel region instead
# of three (A/B, TinyLlama Q4_0 q/k/v of 22 layers from DRAM, three separate arrays: 2.98 -> 2.92 ms). Weights the
# loader repacked into one buffer come as one array (weights.joined: 2.37 -> 2.24 ms in a later A/B).


_MATMUL = """
@njit(parallel=True, cache=True)
def {name}(raws, row_bytes, row0, x, xd, xb, out):
    T, n = x.shape
    nb = n // QK
    ahead = (PREFETCH_BYTES + row_bytes - 1) // row_bytes
    for r in prange(row0[-1]):
        _prefetch_row(raws, row_bytes, row0, r, ahead, 0, row_bytes)
        p = _part(row0, r)
        raw, base = raws[p], (r - row0[p]) * row_bytes
        for t in range(T):
            out[t, r] = {dot}(raw, base, nb, x, t * n, xd, {xb}t * nb)
"""


def _make_matmul(name, row_dot, vnni=False):
    """A matmul kernel over int8 activations through the row dot named row_dot, one compiled kernel per row layout,
    so the row loop carries no per-row type branch. x is x8 for the VNNI dots (which take the offset terms xb too),
    xq (int16) for the generic ones. Defined from a template (templates.define: cached across processes)."""
    return define(globals(), _MATMUL, name=name, dot=row_dot, xb="xb, " if vnni else "")


matmul_q4_0_vnni = _make_matmul("matmul_q4_0_vnni", "dot_row_q4_0_vnni", vnni=True)  # HAS_VNNI only


ROW_TILE = 32  # rows per tile of a batch matmul: 37 KB of TinyLlama rows, L2-resident while the token tiles pass
# blocks of 32 per column range of the K-quants' batch tiles: 8 tokens' activations of 2048 values (16 KB) stay in
# L1 while a tile's rows pass; whole rows of 5632 (45 KB) did not (A/B, TinyLlama Q5_K_M/Q6_K ffn_down, T = 64)
K_COLUMNS = 64

_BATCH_MATMUL = """
@njit(parallel=True, cache=True)
def {name}(raws, row_bytes, row0, x, xd, xb, out):
    T, n = x.shape
    nb = n // QK
    kc = min(nb, {columns}) if {columns} else nb
    rows, T0 = row0[-1], T - T % {tokens}
    ahead = (PREFETCH_BYTES + row_bytes - 1) // row_bytes
    for tile in prange((rows + ROW_TILE - 1) // ROW_TILE):
        r0, r1 = tile * ROW_TILE, min(rows, (tile + 1) * ROW_TILE)
        for c0 in range(0, nb, kc):
            nc, wc = min(kc, nb - c0), c0 * row_bytes // nb
            for t in range(0, T0, {tokens}):
                for r in range(r0, r1):
                    p = _part(row0, r)
                    d = {dot_tokens}(raws[p], (r - row0[p]) * row_bytes + wc, nc, x, t * n + c0 * QK, n, xd, xb,
                                     t * nb + c0, nb)
                    for k in range({tokens}):
                        out[t + k, r] = d[k] if c0 == 0 else out[t + k, r] + d[k]
        for t in range(T0, T):  # a row's column ranges in order: its bytes in one pass, the same sums as the tiles
            for r in range(r0, r1):
                p = _part(row0, r)
                s = np.float32(0.0)
                for c0 in range(0, nb, kc):
                    if T0 == 0:  # the same range of a later row (else the tile's rows are in cache already)
                        _prefetch_row(raws, row_bytes, row0, r, ahead, c0 * row_bytes // nb, min(kc, nb - c0) * row_bytes // nb)
                    d = {dot_row}(raws[p], (r - row0[p]) * row_bytes + c0 * row_bytes // nb, min(kc, nb - c0), x,
                                  t * n + c0 * QK, xd, xb, t * nb + c0)
                    s = d if c0 == 0 else s + d
                out[t, r] = s
"""


def _make_batch_matmul(name, dot_row, dot_tokens, tokens=TOKENS, columns=0):
    """_make_matmul's kernel for VNNI row dots that also come in a TOKENS-token form. A batch runs in tiles:
    ROW_TILE rows (read from memory once, then from L2) against TOKENS tokens at a time (their activations, 16 KB
    for 2048 wide, stay in L1), each block's weights unpacked once for the TOKENS (dot_tokens); the remaining
    tokens one by one. columns (blocks, 0: whole rows): wider rows are dotted in column ranges of that many
    blocks, summed in order, in the tiles and for the remaining tokens alike. The same results as one token at a
    time."""
    return define(globals(), _BATCH_MATMUL, name=name, dot_row=dot_row, dot_tokens=dot_tokens, tokens=tokens,
                  columns=columns)


# weights in the repacked layout (repack_q4_0): A/B against one token per row dot, benchmarks/batch_matmul.py
matmul_q4_0r_vnni = _make_batch_matmul("matmul_q4_0r_vnni", "dot_row_q4_0r_vnni", "dot_tokens_q4_0r_vnni")
matmul_iq4_nlr_vnni = _make_batch_matmul("matmul_iq4_nlr_vnni", "dot_row_iq4_nlr_vnni", "dot_tokens_iq4_nlr_vnni")
matmul_q8_0_vnni = _make_batch_matmul("matmul_q8_0_vnni", "dot_row_q8_0_vnni", "dot_tokens_q8_0_vnni")
matmul_q5_0_vnni = _make_batch_matmul("matmul_q5_0_vnni", "dot_row_q5_0_vnni", "dot_tokens_q5_0_vnni")


VNNI_MATMUL = {Q4_0: matmul_q4_0_vnni, Q4_0R: matmul_q4_0r_vnni, Q8_0: matmul_q8_0_vnni,  # HAS_VNNI only; the
               Q5_0: matmul_q5_0_vnni, IQ4_NLR: matmul_iq4_nlr_vnni}  # other types' route is X8_MATMUL's, and INT8_MATMUL's below without VNNI
# The types whose integer dots read the int8 forms (x8, xd, xb) on every CPU: through vpdpbusd on VNNI CPUs, through
# its arithmetic in generic vector IR elsewhere (identical sums). One batch matmul per type and route,
# matmul_<type>_vnni and matmul_<type>_generic (Q4_1 / Q5_1's min from the activations' block sums; the K-quants and
# IQ4_XS on activations rounded as Q8_K; simd's kquants and iquants frames).
_X8_NAMES = {Q4_K: "q4_k", Q5_K: "q5_k", Q6_K: "q6_k", Q2_K: "q2_k", Q3_K: "q3_k", Q4_1: "q4_1", Q5_1: "q5_1",
             IQ4_NL: "iq4_nl", IQ4_XS: "iq4_xs", Q4_KR: "q4_krk", Q5_KR: "q5_krk", Q6_KR: "q6_krk", Q3_KR: "q3_krk",
             Q2_KR: "q2_krk", IQ4_XSR: "iq4_xsrk"}
for _name in _X8_NAMES.values():
    for _route in ("vnni", "generic"):
        _fn = f"matmul_{_name}_{_route}"
        _kr = "_kr" in _name
        globals()[_fn] = _make_batch_matmul(_fn, f"dot_row_{_name}_{_route}", f"dot_tokens_{_name}_{_route}",
                                            TOKENS_K if _kr else TOKENS, K_COLUMNS if _kr else 0)
# the neuron packs' repacked K-quant dots (activations rounded per 32: quantize_acts) as matmuls, for tests
for _name in ("q4_kr", "q5_kr", "q6_kr", "q3_kr", "q2_kr", "iq4_xsr"):
    for _route in ("vnni", "generic"):
        globals()[f"matmul_{_name}_{_route}"] = _make_matmul(f"matmul_{_name}_{_route}", f"dot_row_{_name}_{_route}",
                                                             vnni=True)
X8_MATMUL = {_t: globals()[f"matmul_{_name}_{'vnni' if HAS_VNNI else 'generic'}"] for _t, _name in _X8_NAMES.items()}


def dot_forms(qtype, forms):
    """(x, xd, bias): the activation forms (quantize_acts' seven, less the input) that the int8 row dots of
    qtype read: the repacked Q4_0 dots xt and xs, Q8_0's generic dot xq, the others x8 and xb."""
    xq, xd, x8, xb, xt, xs = forms
    if qtype in (Q4_0R, IQ4_NLR) or qtype in KR_TYPES:
        return xt, xd, xs
    return (xq, xd, xb) if qtype == Q8_0 and not HAS_VNNI and not X86_AVX2 else (x8, xd, xb)


@njit(parallel=True, cache=True)
def repack_q4_0(raw, rows, row_bytes, out):
    """Q4_0 rows (blocks of an fp16 scale and 16 quant bytes) -> the same bytes per row, regrouped: for each run
    of Q4_0R_GROUP blocks, their scales, then their quants (a shorter run at the row's end). Kernels then load a
    run's scales as one vector (simd.dot_row_q4_0r_vnni). A whole group's quants go across the vector lanes,
    lane k for block k: 32-byte chunk j's byte 4 k + m holds block k's weights 8 j + m (low nibble) and
    8 j + 4 + m (high nibble), so a 32-byte load's low nibbles are 4 weights of each of the 8 blocks, as are
    its high nibbles (simd._q4_0r_group_sums). The shorter run keeps Q4_0's byte order."""
    nb = row_bytes // 18
    G = Q4_0R_GROUP
    whole, m = nb // G, nb % G  # whole groups, then a shorter one of m blocks
    u = np.uint64  # unsigned indices: numba's check for negative ones cost 2.5x (1.3 -> 3.3 GB/s on 2 threads)
    for r in prange(rows):
        base = u(r * row_bytes)
        for g in range(whole):
            dst = base + u(g * 18 * G)
            for k in range(G):
                src = base + u(18 * (g * G + k))
                out[dst + u(2 * k)] = raw[src]
                out[dst + u(2 * k + 1)] = raw[src + u(1)]
                # (a prompt under teal repacks the rows it gave back, layer by layer: teal.PROMPT_ROWS)
                lane_nibbles(raw, src + u(2), out, dst + u(2 * G + 4 * k))
        dst = base + u(whole * 18 * G)
        for k in range(m):  # the shorter group: its scales, then its blocks' bytes in Q4_0's order
            src = base + u(18 * (whole * G + k))
            out[dst + u(2 * k)] = raw[src]
            out[dst + u(2 * k + 1)] = raw[src + u(1)]
            for j in range(16):
                out[dst + u(2 * m + 16 * k + j)] = raw[src + u(2 + j)]


matmul_q8_0 = _make_matmul("matmul_q8_0", "dot_row_q8_0")
matmul_q8_0_generic = _make_batch_matmul("matmul_q8_0_generic", "dot_row_q8_0_generic", "dot_tokens_q8_0_generic")
matmul_q4_0_generic = _make_batch_matmul("matmul_q4_0_generic", "dot_row_q4_0_generic", "dot_tokens_q4_0_generic")
matmul_q5_0_generic = _make_batch_matmul("matmul_q5_0_generic", "dot_row_q5_0_generic", "dot_tokens_q5_0_generic")
matmul_q4_0r_generic = _make_batch_matmul("matmul_q4_0r_generic", "dot_row_q4_0r_generic", "dot_tokens_q4_0r_generic")
matmul_iq4_nlr_generic = _make_batch_matmul("matmul_iq4_nlr_generic", "dot_row_iq4_nlr_generic",
                                            "dot_tokens_iq4_nlr_generic")
INT8_MATMUL = {Q4_0: matmul_q4_0_generic, Q8_0: matmul_q8_0_generic if X86_AVX2 else matmul_q8_0,
               Q5_0: matmul_q5_0_generic, Q4_0R: matmul_q4_0r_generic, IQ4_NLR: matmul_iq4_nlr_generic}
"""out[t, r] = W[r] . x[t] for Q4_0 (repacked: Q4_0R; or in the file's layout) / Q8_0 / Q5_0 weights W on CPUs
without VNNI, activations as int8 blocks (quantize_acts), as llama.cpp's vec_dot_q5_0_q8_0 and its kin compute them:
Q4_0R, Q4_0 and Q5_0 through the VNNI dots' code in generic IR (xt and xs; x8 and xb), Q8_0 too on x86 with AVX2
(pmaddubsw on signed bytes: simd.ir._dpbssd_avx2), elsewhere through its int16 dot (xq)."""
# weight types whose dense dots read activations rounded as llama.cpp's Q8_K (quantize_acts_k), on every CPU
Q8K_TYPES = (Q4_K, Q5_K, Q6_K, Q2_K, Q3_K, IQ4_XS) + KR_TYPES
# weight types whose row dots read the int8 activation forms (the K-quants through their VNNI or generic dots)
INT8_TYPES = (Q4_0, Q8_0, Q5_0, Q4_0R, Q4_K, Q5_K, Q6_K, Q4_1, Q5_1, Q2_K, Q3_K, IQ4_NL, IQ4_XS, IQ4_NLR) + KR_TYPES


@njit(parallel=True, cache=True, fastmath=True)
def matmul_f32(ws, row0, x, out):
    """out[t, r] = W[r] . x[t] for float32 weight matrices ws (rows, n)."""
    T, n = x.shape
    for r in prange(row0[-1]):
        p = _part(row0, r)
        w, i0 = ws[p], r - row0[p]
        for t in range(T):
            acc = np.float32(0.0)
            for i in range(n):
                acc += w[i0, i] * x[t, i]
            out[t, r] = acc


@njit(parallel=True, cache=True, fastmath=True)
def matmul_dequant(raws, row_bytes, qtype, row0, x, out):
    """out[t, r] = W[r] . x[t]: each row dequantized once into an L1-resident scratch row."""
    T, n = x.shape
    rows = row0[-1]
    nthreads = 64
    chunk = (rows + nthreads - 1) // nthreads
    for c in prange(nthreads):
        scratch = np.empty(n, dtype=np.float32)
        for r in range(c * chunk, min(rows, (c + 1) * chunk)):
            p = _part(row0, r)
            dequant_row(raws[p], (r - row0[p]) * row_bytes, qtype, n, scratch)
            for t in range(T):
                acc = np.float32(0.0)
                for i in range(n):
                    acc += scratch[i] * x[t, i]
                out[t, r] = acc


@njit(parallel=True, cache=True)
def nonfinite_row(raw, row_bytes, qtype, rows, n):
    """The first row of a tensor whose dequantized values hold a NaN or an Inf (a non-finite block scale, say), or -1."""
    bad = np.zeros(rows, np.bool_)
    for r in prange(rows):
        scratch = np.empty(n, np.float32)
        dequant_row(raw, r * row_bytes, qtype, n, scratch)
        for i in range(n):
            if not np.isfinite(scratch[i]):
                bad[r] = True
                break
    for r in range(rows):
        if bad[r]:
            return r
    return -1


@njit(cache=True)
def gather_rows(raw, row_bytes, qtype, n, ids, out):
    """out[i] = dequantized row ids[i] (embedding lookup)."""
    for i in range(ids.shape[0]):
        dequant_row(raw, ids[i] * row_bytes, qtype, n, out[i])
