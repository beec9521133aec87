"""numba kernels for the sparse FFN: neuron selection, the neuron-pack kernel (per kept neuron: gate and up
row dots, then an axpy of its down column) and the pack's re-quantizers. Cost is proportional to the
neurons kept.

Decode only (one token): prompt batches use the dense kernels with per-token masks (see sparse_ffn).
"""
import numpy as np
from numba import njit, prange

from .ops import activate, activate_row, up_part
from .quant import (F32, INT8_TYPES, KR_TYPES, Q8K_TYPES, acts_forms_k, IQ4_NL, IQ4_NLR, IQ4_XS, IQ4_XSR, Q2_K, Q2_KR, Q3_K, Q3_KR, Q4_0, Q4_0R, Q4_1,
                    Q4_K, Q4_KR, Q5_0, Q5_1, Q5_K, Q5_KR, Q6_K, Q6_KR, Q8_0, QK, acts_forms, dequant_row)
from .simd import (AXPY_Q4_COLUMNS, Q4_0R_GROUP, axpy_i8_generic, axpy_i8_vnni, axpy_q4_generic, axpy_q4_vnni, axpy_units_f32,
                   coefs_q4_vnni, dot_gate_up_q4_0r_generic, dot_gate_up_q4_0r_vnni, dot_row_f32, dot_row_q4_0_generic, dot_row_q4_0_vnni,
                   dot_row_q4_0r_generic, dot_row_q4_0r_vnni, dot_row_q4_k_vnni, dot_row_q5_0_generic, dot_row_q5_0_vnni, dot_row_q5_k_vnni,
                   dot_row_q6_k_vnni, dot_row_q8_0, dot_row_q8_0_vnni, dot_row_q8_0_generic, X86_AVX2, prefetch, dot_row_q4_k_generic,
                   dot_row_q5_k_generic, dot_row_q6_k_generic, dot_row_q4_1_vnni, dot_row_q5_1_vnni,
                   dot_row_q4_1_generic, dot_row_q5_1_generic, dot_row_q2_k_vnni, dot_row_q3_k_vnni,
                   dot_row_q2_k_generic, dot_row_q3_k_generic, dot_row_iq4_nl_vnni, dot_row_iq4_nl_generic,
                   dot_row_iq4_xs_vnni, dot_row_iq4_xs_generic, dot_row_q4_kr_vnni, dot_row_q4_kr_generic,
                   dot_row_q6_kr_vnni, dot_row_q6_kr_generic, dot_row_q5_kr_vnni, dot_row_q5_kr_generic,
                   dot_row_q4_krk_vnni, dot_row_q4_krk_generic, dot_row_q5_krk_vnni, dot_row_q5_krk_generic,
                   dot_row_q6_krk_vnni, dot_row_q6_krk_generic, dot_row_q3_kr_vnni, dot_row_q3_kr_generic,
                   dot_row_q2_kr_vnni, dot_row_q2_kr_generic, dot_row_q3_krk_vnni, dot_row_q3_krk_generic,
                   dot_row_q2_krk_vnni, dot_row_q2_krk_generic, dot_row_iq4_xsr_vnni, dot_row_iq4_xsr_generic,
                   dot_row_iq4_xsrk_vnni, dot_row_iq4_xsrk_generic, dot_row_iq4_nlr_vnni, dot_row_iq4_nlr_generic)

# The down axpy sums into private partial sums, parts (n_parts, dim), one per thread (the caller's
# buffer, see ffn_pack.part_sums): threads split the kept neurons evenly. One per thread rather than a
# fixed 8 allocated per call: numba's static schedule gives each thread a run of parts anyway, and each
# part costs a zeroed row and its share of the final sum.
MAX_PARTS = 64
AXPY_GROUP = AXPY_Q4_COLUMNS  # kept neurons added per pass over a partial sum: the VNNI axpy's 8 (see its A/B)
# How far ahead pack_ffn prefetches, in neurons. The prefetch is spread over the compute, a third of a unit
# at three points per neuron (_prefetch_step): a burst of prefetches (4 units, 224 lines, at once) stalls
# the core until its miss buffers drain, so memory and compute took turns. A/B on random sets of the
# TinyLlama Q4_0 pack from DRAM, 2 threads: f = 0.25 8.8 -> 4.7 ms, f = 0.05 1.5 -> 0.92 ms; halves
# around the first dot measured within 5%; distances 2 and 4 alike, 8 slower.
PREFETCH_UNITS = 4
# pack_ffn's gated paired path prefetches inside its kernels instead: each paired dot issues a few lines per
# group of the unit PREFETCH_AHEAD kept neurons on, and each axpy a line per block of those units' last
# lines, so the loads leave at the pace of the compute however LLVM lays out the loops. A/B in one process
# (random sets of the TinyLlama Q4_0 pack from DRAM, 2 threads, 20 interleaved repetitions, the same sums),
# against the cursor above: f = 0.5 8-10% faster, 0.25 5-9%, 0.1 3-8%, for distances 4 to 16 alike (2
# slower); prefetch locality 1 alike, 3 and 0 1.4x slower. With 8-neuron axpy groups, two groups ahead (16)
# beat one (8) at f = 0.5 by 6-8% in two A/B runs (8.75 -> 8.24, 9.05 -> 8.34 ms), alike at 0.25 and 0.1;
# 24 and 32 alike with 16, 4 slower.
PREFETCH_AHEAD = 16
# select_pack_ffn requests a kept unit's bytes UNIT_STEP at a time, one step per selection row scanned, and dots
# the neuron at the first find after its last step. A/B on real decode inputs of the planted TinyLlama Q4_K_M (22
# layers, one process, on an AVX2 Zen 3) against the whole unit requested at its find and dotted 4 finds later:
# 8.19 -> 7.41 ms at 512 bytes a row, 7.48-7.58 at 128-384, 7.43 at 768, 7.70 for the whole unit at once (dotted
# at the next find): a burst of 36 line requests stalled the scan's own loads.
UNIT_STEP = 512
PACK_QUEUE = 24  # kept neurons select_pack_ffn may hold back while their units load: a run of finds denser than
# the steps can request is dotted once this many wait
SELECT_PREFETCH_ROWS = 32  # how far ahead select_pack_ffn prefetches its dense selection rows (A/B below)


@njit(cache=True)
def select_threshold(a, t, idx):
    """Indices i with |a[i]| > t into idx; returns the count. (t = 0 keeps exactly the non-zeros.)"""
    n = 0
    for i in range(a.shape[0]):  # branch-free, as kernels.columns._kept
        idx[n] = i
        n += abs(a[i]) > t
    return n


@njit(cache=True)
def select_topk(a, k, idx):
    """The k largest |a[i]| (fewer if fewer are non-zero) into idx, in index order; returns the count."""
    m = a.shape[0]
    if k >= m:
        return select_threshold(a, np.float32(0.0), idx)
    mag = np.abs(a)
    kth = np.partition(mag, m - k)[m - k]  # k-th largest magnitude
    n = 0
    for i in range(m):  # strictly above the k-th first, then ties, so exactly k are kept
        if mag[i] > kth:
            idx[n] = i
            n += 1
    if kth > 0:
        for i in range(m):
            if n >= k:
                break
            if mag[i] == kth:
                idx[n] = i
                n += 1
        idx[:n].sort()
    return n


@njit(cache=True, fastmath=True, error_model="numpy")
def activate_masked(g, u, act, k, t, h, counts):
    """Prompt batches: h = act(g) * u (gated; act(u) when g is empty) for the neurons a policy keeps per
    token, 0 elsewhere: the k largest |act| when k > 0 (select_topk), else |act| > t. counts[token] =
    neurons kept. The dense FFN's activation step plus the mask, in one pass over the batch."""
    T, n = h.shape
    gated = g.shape[0] > 0
    a = np.empty(n, np.float32)
    idx = np.empty(n, np.int64)
    for r in range(T):
        activate_row(g[r] if gated else u[r], act, a)
        kept = select_topk(a, k, idx) if k > 0 else select_threshold(a, t, idx)
        h[r, :] = 0.0
        for j in range(kept):
            i = idx[j]
            h[r, i] = a[i] * up_part(u[r, i], act) if gated else a[i]
        counts[r] = kept


DOWN_F32, DOWN_Q4, DOWN_Q8 = 0, 1, 2  # down-column formats of a neuron pack (see ffn_pack.py)


@njit(inline="always")
def down_bytes(kind, dim):
    """Bytes of one neuron's down column in a pack: quants then an fp16 scale per 32 (float32 columns: 4 dim)."""
    return 4 * dim if kind == DOWN_F32 else (dim // 2 if kind == DOWN_Q4 else dim) + dim // 16
AXPY_ONLY, COEF_TIMES_DOT, ACT_OF_DOT, GATED_DOTS = 0, 1, 2, 3  # how a kept neuron's weight h is formed


@njit(inline="always")
def _gate_up_dots(u, base, nbi, xt, xd, xs, pf, pf_lines, vnni):
    """(gate . x, up . x) of an interleaved repacked Q4_0 unit (dot_gate_up_q4_0r), on the CPU's route."""
    if vnni:
        return dot_gate_up_q4_0r_vnni(u, base, nbi, xt, 0, xd, xs, 0, pf, pf_lines)
    return dot_gate_up_q4_0r_generic(u, base, nbi, xt, 0, xd, xs, 0, pf, pf_lines)


@njit(inline="always")
def _row_dot(u, off, qtype, vnni, x, xq, xd, x8, xb, xt, xs, scratch):
    """The row at u[off:] (GGUF row format of qtype) dotted with the token's activations (x and its
    quant.quantize_acts forms)."""
    cols = x.shape[1]
    if qtype == Q4_0R:  # Q4_0 and the K-quants repacked at load (every CPU: weights.REPACK)
        return dot_row_q4_0r_vnni(u, off, cols // QK, xt, 0, xd, xs, 0) if vnni else \
            dot_row_q4_0r_generic(u, off, cols // QK, xt, 0, xd, xs, 0)
    if qtype == Q4_KR:
        return dot_row_q4_kr_vnni(u, off, cols // QK, xt, 0, xd, xs, 0) if vnni else \
            dot_row_q4_kr_generic(u, off, cols // QK, xt, 0, xd, xs, 0)
    if qtype == Q5_KR:
        return dot_row_q5_kr_vnni(u, off, cols // QK, xt, 0, xd, xs, 0) if vnni else \
            dot_row_q5_kr_generic(u, off, cols // QK, xt, 0, xd, xs, 0)
    if qtype == Q6_KR:
        return dot_row_q6_kr_vnni(u, off, cols // QK, xt, 0, xd, xs, 0) if vnni else \
            dot_row_q6_kr_generic(u, off, cols // QK, xt, 0, xd, xs, 0)
    if qtype == Q3_KR:
        return dot_row_q3_kr_vnni(u, off, cols // QK, xt, 0, xd, xs, 0) if vnni else \
            dot_row_q3_kr_generic(u, off, cols // QK, xt, 0, xd, xs, 0)
    if qtype == Q2_KR:
        return dot_row_q2_kr_vnni(u, off, cols // QK, xt, 0, xd, xs, 0) if vnni else \
            dot_row_q2_kr_generic(u, off, cols // QK, xt, 0, xd, xs, 0)
    if qtype == IQ4_XSR:
        return dot_row_iq4_xsr_vnni(u, off, cols // QK, xt, 0, xd, xs, 0) if vnni else \
            dot_row_iq4_xsr_generic(u, off, cols // QK, xt, 0, xd, xs, 0)
    if qtype == IQ4_NLR:
        return dot_row_iq4_nlr_vnni(u, off, cols // QK, xt, 0, xd, xs, 0) if vnni else \
            dot_row_iq4_nlr_generic(u, off, cols // QK, xt, 0, xd, xs, 0)
    if qtype == Q4_0 and vnni:
        return dot_row_q4_0_vnni(u, off, cols // QK, x8, 0, xd, xb, 0)
    if qtype == Q4_0:
        return dot_row_q4_0_generic(u, off, cols // QK, x8, 0, xd, xb, 0)
    if qtype == Q8_0 and vnni:
        return dot_row_q8_0_vnni(u, off, cols // QK, x8, 0, xd, xb, 0)
    if qtype == Q4_K and vnni:
        return dot_row_q4_k_vnni(u, off, cols // QK, x8, 0, xd, xb, 0)
    if qtype == Q5_K and vnni:
        return dot_row_q5_k_vnni(u, off, cols // QK, x8, 0, xd, xb, 0)
    if qtype == Q6_K and vnni:
        return dot_row_q6_k_vnni(u, off, cols // QK, x8, 0, xd, xb, 0)
    if qtype == Q4_K:  # CPUs without VNNI: the same sums in generic vector IR
        return dot_row_q4_k_generic(u, off, cols // QK, x8, 0, xd, xb, 0)
    if qtype == Q5_K:
        return dot_row_q5_k_generic(u, off, cols // QK, x8, 0, xd, xb, 0)
    if qtype == Q6_K:
        return dot_row_q6_k_generic(u, off, cols // QK, x8, 0, xd, xb, 0)
    if qtype == Q4_1:
        return dot_row_q4_1_vnni(u, off, cols // QK, x8, 0, xd, xb, 0) if vnni else \
            dot_row_q4_1_generic(u, off, cols // QK, x8, 0, xd, xb, 0)
    if qtype == Q5_1:
        return dot_row_q5_1_vnni(u, off, cols // QK, x8, 0, xd, xb, 0) if vnni else \
            dot_row_q5_1_generic(u, off, cols // QK, x8, 0, xd, xb, 0)
    if qtype == Q2_K:
        return dot_row_q2_k_vnni(u, off, cols // QK, x8, 0, xd, xb, 0) if vnni else \
            dot_row_q2_k_generic(u, off, cols // QK, x8, 0, xd, xb, 0)
    if qtype == Q3_K:
        return dot_row_q3_k_vnni(u, off, cols // QK, x8, 0, xd, xb, 0) if vnni else \
            dot_row_q3_k_generic(u, off, cols // QK, x8, 0, xd, xb, 0)
    if qtype == IQ4_NL:
        return dot_row_iq4_nl_vnni(u, off, cols // QK, x8, 0, xd, xb, 0) if vnni else \
            dot_row_iq4_nl_generic(u, off, cols // QK, x8, 0, xd, xb, 0)
    if qtype == IQ4_XS:
        return dot_row_iq4_xs_vnni(u, off, cols // QK, x8, 0, xd, xb, 0) if vnni else \
            dot_row_iq4_xs_generic(u, off, cols // QK, x8, 0, xd, xb, 0)
    if qtype == Q8_0:
        return dot_row_q8_0_generic(u, off, cols // QK, x8, 0, xd, xb, 0) if X86_AVX2 else \
            dot_row_q8_0(u, off, cols // QK, xq, 0, xd, 0)
    if qtype == Q5_0 and vnni:
        return dot_row_q5_0_vnni(u, off, cols // QK, x8, 0, xd, xb, 0)
    if qtype == Q5_0:
        return dot_row_q5_0_generic(u, off, cols // QK, x8, 0, xd, xb, 0)
    if qtype == F32:
        return dot_row_f32(u, off, cols, x)
    dequant_row(u, off, qtype, cols, scratch)
    acc = np.float32(0.0)
    for i in range(cols):
        acc += scratch[i] * x[0, i]
    return acc


@njit(inline="always")
def _row_dot_k(w, off, qtype, vnni, cols, kt, kd, ks):
    """A repacked K-quant row (quant.KR_TYPES) dotted with activations rounded as Q8_K (quant.acts_forms_k's kt, kd, ks):
    the dense matmuls' dot, so a threshold policy's selection sees the dense path's gate values bit for bit."""
    nb = cols // QK
    if qtype == Q4_KR:
        return dot_row_q4_krk_vnni(w, off, nb, kt, 0, kd, ks, 0) if vnni else \
            dot_row_q4_krk_generic(w, off, nb, kt, 0, kd, ks, 0)
    if qtype == Q5_KR:
        return dot_row_q5_krk_vnni(w, off, nb, kt, 0, kd, ks, 0) if vnni else \
            dot_row_q5_krk_generic(w, off, nb, kt, 0, kd, ks, 0)
    if qtype == Q3_KR:
        return dot_row_q3_krk_vnni(w, off, nb, kt, 0, kd, ks, 0) if vnni else \
            dot_row_q3_krk_generic(w, off, nb, kt, 0, kd, ks, 0)
    if qtype == Q2_KR:
        return dot_row_q2_krk_vnni(w, off, nb, kt, 0, kd, ks, 0) if vnni else \
            dot_row_q2_krk_generic(w, off, nb, kt, 0, kd, ks, 0)
    if qtype == IQ4_XSR:
        return dot_row_iq4_xsrk_vnni(w, off, nb, kt, 0, kd, ks, 0) if vnni else \
            dot_row_iq4_xsrk_generic(w, off, nb, kt, 0, kd, ks, 0)
    return dot_row_q6_krk_vnni(w, off, nb, kt, 0, kd, ks, 0) if vnni else \
        dot_row_q6_krk_generic(w, off, nb, kt, 0, kd, ks, 0)


@njit(inline="always")
def _unit_dot(u, off, qtype, vnni, x, xq, xd, x8, xb, xt, xs, scratch, kd, k8, kb, kt, ks):
    """A pack unit's row dotted with the token: the K-quants (Q8K_TYPES, repacked or in the file's layout) with the
    dense matmul's Q8_K forms (quant.acts_forms_k's kd, k8, kb, kt, ks), so a kept neuron's value is the dense path's
    (and a 2048-wide Q4_KR row costs 65 ns against 94 with the per-32 forms, AVX2); every other type as _row_dot."""
    if qtype in KR_TYPES:
        return _row_dot_k(u, off, qtype, vnni, x.shape[1], kt, kd, ks)
    k = qtype in Q8K_TYPES  # the forms chosen first: one _row_dot a call site (each is a large switch to compile)
    return _row_dot(u, off, qtype, vnni, x, xq, kd if k else xd, k8 if k else x8, kb if k else xb, xt, xs, scratch)


@njit(inline="always")
def _coefs_i8(u, offs, h, cnt, nb, qbytes, co):
    """axpy_q4_vnni's and axpy_i8_vnni's coefficients (simd.coefs_q4_vnni) for the group's down columns at
    u[offs[g]:] (nb blocks of quants, qbytes in all, then nb fp16 scales): per block b, c_g = h_g * scale(g, b) rounded to int8 with one scale per
    block. co = (cw, cz, cs). A group of fewer than AXPY_GROUP is padded with coefficient 0 on the first column
    (offs and h are the group's scratch)."""
    for g in range(cnt, AXPY_GROUP):
        offs[g] = offs[0]
        h[g] = 0.0
    coefs_q4_vnni(u, offs, h, nb, qbytes, co[0], co[1], co[2])


@njit(inline="always")
def _coef_scratch(nb):
    return np.empty(nb * (AXPY_GROUP // 4), np.int32), np.empty(nb, np.int32), np.empty(nb, np.float32)


@njit(inline="always")
def _axpy(acc, u, offs, h, cnt, nbo, down_kind, vnni, co, ahead):
    """acc += sum_g h[g] * the down column at u[offs[g]:], in the pack's down format (co: _coef_scratch).
    The VNNI axpys (4-bit and int8 columns) also prefetch two lines per block from the byte offsets ahead (see
    axpy_q4_vnni)."""
    if down_kind == DOWN_Q4 and vnni:
        _coefs_i8(u, offs, h, cnt, nbo, nbo * 16, co)
        axpy_q4_vnni(acc, u, offs, co[0], co[1], co[2], nbo, ahead)
    elif down_kind == DOWN_Q4:  # the same integer sums in generic IR (AVX2: pmaddubsw)
        _coefs_i8(u, offs, h, cnt, nbo, nbo * 16, co)
        axpy_q4_generic(acc, u, offs, co[0], co[1], co[2], nbo, ahead)
    elif down_kind == DOWN_Q8 and vnni:
        _coefs_i8(u, offs, h, cnt, nbo, nbo * 32, co)
        axpy_i8_vnni(acc, u, offs, co[0], co[1], co[2], nbo, ahead)
    elif down_kind == DOWN_Q8:  # the same integer sums in generic IR (AVX2: channel pairs through pmaddubsw)
        _coefs_i8(u, offs, h, cnt, nbo, nbo * 32, co)
        axpy_i8_generic(acc, u, offs, co[0], co[1], co[2], nbo, ahead)
    else:
        axpy_units_f32(acc, u, offs, h, cnt, nbo)


@njit(inline="always")
def _prefetch_step(u, idx, pu, pb, end, unit_bytes, lo, hi, step):
    """Prefetch the next `step` bytes of kept unit idx[pu] from byte pb (its bytes [lo, hi) are read; units are
    unit_bytes apart); returns the advanced cursor (pu, pb). Nothing once pu reaches end."""
    if pu < end:
        nb = min(step, hi - pb)
        prefetch(u, idx[pu] * unit_bytes + pb, nb)
        pb += nb
        if pb >= hi:
            pu += 1
            pb = lo
    return pu, pb


@njit(inline="always")
def _sum_parts(parts, out):
    """out = the sum of the partial-sum rows, row by row (contiguous, vectorized: 0.2 us for 2 x 2048 where
    summing each column across the rows took 4 us)."""
    out[:] = parts[0]
    for c in range(1, parts.shape[0]):
        row = parts[c]
        for k in range(out.shape[0]):
            out[k] += row[k]


@njit(parallel=True, cache=True, fastmath=True)
def pack_ffn(u, unit_bytes, up_at, down_at, gate_qtype, up_qtype, vnni, down_kind, dim, idx, n, coef, mode, act_id, x,
             parts, out):
    """One decode token's FFN over the kept neurons of a neuron pack. u: flat uint8, n_ff units unit_bytes apart
    (the stride may include page padding: ffn_pack.unit_stride), each the neuron's gate row (if the pack has
    one) from byte 0, its up row from byte up_at and its down column from byte down_at. A gate and an up row
    both repacked Q4_0 are interleaved instead (ffn_pack.interleave_rows: gate and up groups alternate from
    byte 0), and dot_gate_up_q4_0r_vnni reads the two in one stream.
    out (dim,) = sum_j h_j * down_{idx[j]}, with h_j formed by mode:
      AXPY_ONLY       coef[j]                          non-gated FFN, activation computed densely
      COEF_TIMES_DOT  coef[j] * (up . x)               CATS: coef = act(gate) from the dense gate
      ACT_OF_DOT      act(up . x)                      non-gated FFN, predicted set
      GATED_DOTS      act(gate . x) * (up . x)         gated FFN, predicted set (pack holds the gate)
    Each mode reads one contiguous run of a unit (prefetched PREFETCH_UNITS neurons ahead, spread over the
    compute; PREFETCH_AHEAD, from inside the kernels, on the gated paired path), so a kept neuron costs one
    2.4-3.6 KB stream rather than two or three random rows, all in one parallel region.
    Threads split the kept neurons evenly (parts: one private partial sum per thread). x (1, cols) is quantized
    here when the dots read int8 blocks (as in select_pack_ffn: one call per layer and token, not two, and no
    six arrays boxed out of numba and back: 16.1 -> 12.9 us a layer at one kept neuron)."""
    k_up, k_gate = mode != AXPY_ONLY and up_qtype in Q8K_TYPES, mode == GATED_DOTS and gate_qtype in Q8K_TYPES
    _, kd, k8, kb, kt, ks = acts_forms_k(x if k_up or k_gate else x[:0])  # _unit_dot's forms for the K-quants
    int8 = mode != AXPY_ONLY and up_qtype in INT8_TYPES and not k_up or \
        mode == GATED_DOTS and gate_qtype in INT8_TYPES and not k_gate
    xq, xd, x8, xb, xt, xs = acts_forms(x, int8)
    nbo, nbi = dim // QK, x.shape[1] // QK
    # gate and up interleaved, dotted in one block loop. A/B, random sets of the TinyLlama Q4_0 pack, 22 layers:
    # the two rows in one loop from L2 299 against 319 ns a unit, from DRAM at f = 0.5 3-4% faster; then
    # interleaving them in memory (one stream instead of two 1152 bytes apart): from DRAM 4.6% faster again at
    # f = 0.5 (12.19 -> 11.63 ms), 2% at 0.25, alike at 0.1 and 0.05, the same sums.
    # The dense matmul does not pair rows: two interleaved row streams per thread ran 1.2-1.5x slower from DRAM.
    paired = gate_qtype == Q4_0R and up_qtype == Q4_0R
    lo = down_at if mode == AXPY_ONLY else 0 if mode == GATED_DOTS else up_at  # first byte this mode reads
    hi = down_at + down_bytes(down_kind, dim)  # the unit's end; the rest of its stride is page padding
    step = ((hi - lo + 191) // 192) * 64  # a third of the bytes read per unit, in whole cache lines
    # the in-kernel prefetch (PREFETCH_AHEAD): the axpy reaches (nbo + 3) // 4 lines of each unit, the paired
    # dot the head lines before them, head_per_group in each whole group
    spread = mode == GATED_DOTS and paired and down_kind == DOWN_Q4 and nbi >= Q4_0R_GROUP
    head = (hi + 63) // 64 - (nbo + 3) // 4
    head_per_group = (head + nbi // Q4_0R_GROUP - 1) // max(1, nbi // Q4_0R_GROUP)
    n_parts = parts.shape[0]
    chunk = (n + n_parts - 1) // n_parts
    for c in prange(n_parts):
        acc = parts[c]
        acc[:] = 0.0
        ahead = np.full(AXPY_GROUP, -1, np.int64)  # byte offsets the axpy prefetches from (-1: none)
        offs = np.empty(AXPY_GROUP, np.int64)
        h = np.empty(AXPY_GROUP, np.float32)
        co = _coef_scratch(nbo)
        scratch = np.empty(x.shape[1], np.float32)
        end = min(n, (c + 1) * chunk)
        if spread:
            # the first PREFETCH_AHEAD units at once; then the unit PREFETCH_AHEAD on: lines [0, head) by its
            # paired dot, the rest (from byte head * 64) by the group's axpy, one line per block
            for k in range(c * chunk, min(end, c * chunk + PREFETCH_AHEAD)):
                prefetch(u, idx[k] * unit_bytes, hi)
            for j in range(c * chunk, end, AXPY_GROUP):
                cnt = min(AXPY_GROUP, end - j)
                for g in range(AXPY_GROUP):
                    t = j + g + PREFETCH_AHEAD
                    ahead[g] = idx[t] * unit_bytes if g < cnt and t < end else -1
                    if g < cnt:
                        base = idx[j + g] * unit_bytes
                        dg, d = _gate_up_dots(u, base, nbi, xt, xd, xs, ahead[g], head_per_group, vnni)
                        h[g] = activate(dg, act_id) * up_part(d, act_id)
                        offs[g] = base + down_at
                    if ahead[g] >= 0:
                        ahead[g] += head * 64
                _axpy(acc, u, offs, h, cnt, nbo, down_kind, vnni, co, ahead)
            continue
        # prefetch cursor: unit pu from byte pb on; the first PREFETCH_UNITS units at once, then a third of a
        # unit at each of three steps per neuron computed, so it stays PREFETCH_UNITS ahead
        pu, pb = c * chunk + PREFETCH_UNITS, lo
        for k in range(c * chunk, min(end, pu)):
            prefetch(u, idx[k] * unit_bytes + lo, hi - lo)
        for j in range(c * chunk, end, AXPY_GROUP):
            cnt = min(AXPY_GROUP, end - j)
            for g in range(cnt):
                base = idx[j + g] * unit_bytes
                pu, pb = _prefetch_step(u, idx, pu, pb, end, unit_bytes, lo, hi, step)
                if mode == AXPY_ONLY:
                    h[g] = coef[j + g]
                elif mode == GATED_DOTS and paired:
                    dg, d = _gate_up_dots(u, base, nbi, xt, xd, xs, -1, 0, vnni)
                    pu, pb = _prefetch_step(u, idx, pu, pb, end, unit_bytes, lo, hi, step)
                    h[g] = activate(dg, act_id) * up_part(d, act_id)
                else:
                    d = _unit_dot(u, base + up_at, up_qtype, vnni, x, xq, xd, x8, xb, xt, xs, scratch, kd, k8, kb, kt, ks)
                    pu, pb = _prefetch_step(u, idx, pu, pb, end, unit_bytes, lo, hi, step)
                    if mode == COEF_TIMES_DOT:
                        h[g] = coef[j + g] * up_part(d, act_id)
                    elif mode == ACT_OF_DOT:
                        h[g] = activate(d, act_id)
                    else:
                        h[g] = activate(_unit_dot(u, base, gate_qtype, vnni, x, xq, xd, x8, xb, xt, xs, scratch, kd, k8,
                                                  kb, kt, ks), act_id) * up_part(d, act_id)
                if mode == AXPY_ONLY:
                    pu, pb = _prefetch_step(u, idx, pu, pb, end, unit_bytes, lo, hi, step)
                pu, pb = _prefetch_step(u, idx, pu, pb, end, unit_bytes, lo, hi, step)
                offs[g] = base + down_at
            _axpy(acc, u, offs, h, cnt, nbo, down_kind, vnni, co, ahead)
    _sum_parts(parts, out)


@njit(parallel=True, cache=True, fastmath=True)
def select_pack_ffn(w, row_bytes, qtype, rows, gid, t, act_id, gated, u, unit_bytes, down_at, up_qtype, vnni,
                    down_kind, dim, x, parts, out):
    """A threshold policy's whole decode FFN in one parallel region: each thread computes its share of the
    selection rows w (the gate of a gated FFN, else up; rows of any type, row r is neuron gid[r]), keeps
    neuron r when |act(w_r . x)| > t and queues it; each row scanned then prefetches the next UNIT_STEP bytes
    of the queued units, and a kept neuron whose unit is wholly requested runs as pack_ffn would (h = a * (up . x)
    gated, else h = a) at the next find. The dense selection stream then hides the latency of the kept units'
    random reads, and one region replaces four kernel calls (A/B on the planted TinyLlama at threshold:0: FFN
    7.6% faster than matmul + select + pack_ffn). The kept work is spread over the scan: one up dot per kept
    neuron found, and the down axpy once a group (AXPY_GROUP) is dotted, rather than a group's dots and axpy in
    one burst, during which the memory stream ran dry (A/B on real decode inputs, 22 layers: 5.80 -> 5.70 ms,
    same sums). The selection rows are prefetched SELECT_PREFETCH_ROWS ahead: the hardware prefetcher's stream
    stalls while a kept unit is computed (A/B on real decode inputs of the planted TinyLlama, 22 layers: 9.1 ->
    8.1 ms; distances 16 and 32 alike, 64 slower; it costs 2% when nothing is kept). The pack holds no gate rows.
    Returns the number kept. x (1, cols) is quantized here when the rows' dots read int8 blocks: one call per
    layer and token carries the whole FFN (the Python around it measured ~15 us a layer)."""
    nbo = dim // QK
    # K-quant rows (the selection's and the up rows) are dotted with the dense path's Q8_K forms (_unit_dot): the
    # selection sees the dense gate bit for bit
    k_sel, k_up = qtype in Q8K_TYPES, gated and up_qtype in Q8K_TYPES
    _, kd, k8, kb, kt, ks = acts_forms_k(x if k_sel or k_up else x[:0])
    # the per-32 forms: the other selection rows' dots and the packs' other up rows
    xq, xd, x8, xb, xt, xs = acts_forms(x, (qtype in INT8_TYPES and not k_sel) or (gated and up_qtype in INT8_TYPES
                                                                                    and not k_up))
    lo, hi = (0 if gated else down_at), down_at + down_bytes(down_kind, dim)  # the bytes of a unit it reads
    n_parts = parts.shape[0]
    counts = np.zeros(n_parts, np.int64)  # neurons kept by each part
    chunk = (rows + n_parts - 1) // n_parts
    for c in prange(n_parts):
        acc = parts[c]
        acc[:] = 0.0
        offs = np.empty(AXPY_GROUP, np.int64)
        h = np.empty(AXPY_GROUP, np.float32)
        co = _coef_scratch(nbo)
        no_prefetch = np.full(AXPY_GROUP, -1, np.int64)
        # kept neurons in order of finding: [0, dotted) have h and offs set (at most a group), the rest wait
        # for their units; [dotted, pq) are wholly requested, pq's unit up to byte pb
        q_id = np.empty(PACK_QUEUE + AXPY_GROUP, np.int64)
        q_a = np.empty(PACK_QUEUE + AXPY_GROUP, np.float32)
        scratch = np.empty(x.shape[1], np.float32)
        queued = dotted = kept = 0
        pq, pb = 0, lo
        end = min(rows, (c + 1) * chunk)
        r = c * chunk
        while True:
            a = np.float32(0.0)
            while r < end:  # the dense scan, to the next kept row: a tight loop of row dots (A/B: 2% faster)
                if r + SELECT_PREFETCH_ROWS < end:
                    prefetch(w, (r + SELECT_PREFETCH_ROWS) * row_bytes, row_bytes)
                if pq < queued:  # the queued units' next bytes
                    nb = min(UNIT_STEP, hi - pb)
                    prefetch(u, q_id[pq] * unit_bytes + pb, nb)
                    pb += nb
                    if pb >= hi:
                        pq, pb = pq + 1, lo
                a = activate(_unit_dot(w, r * row_bytes, qtype, vnni, x, xq, xd, x8, xb, xt, xs, scratch, kd, k8, kb, kt, ks),
                             act_id)
                if abs(a) > t:
                    break
                r += 1
            if r < end:  # row r is kept: queue it
                q_id[queued] = gid[r]
                q_a[queued] = a
                queued += 1
                kept += 1
                r += 1
            # dot the oldest waiting neuron once its unit is wholly requested (or the queue is full; at the end: all)
            while dotted < queued and (pq > dotted or queued - dotted > PACK_QUEUE or r >= end):
                if pq == dotted:  # the rest of its unit at once
                    prefetch(u, q_id[dotted] * unit_bytes + pb, hi - pb)
                    pq, pb = dotted + 1, lo
                base = q_id[dotted] * unit_bytes
                h[dotted] = q_a[dotted] * up_part(_unit_dot(u, base, up_qtype, vnni, x, xq, xd, x8, xb, xt, xs, scratch,
                                                            kd, k8, kb, kt, ks), act_id) if gated else q_a[dotted]
                offs[dotted] = base + down_at
                dotted += 1
                if dotted == AXPY_GROUP or (r >= end and dotted == queued):  # a full group (or the last): axpy
                    _axpy(acc, u, offs, h, dotted, nbo, down_kind, vnni, co, no_prefetch)
                    for g in range(queued - dotted):
                        q_id[g] = q_id[g + dotted]
                        q_a[g] = q_a[g + dotted]
                    queued -= dotted
                    pq -= dotted
                    dotted = 0
                if r < end:  # one dot per find while the scan goes on
                    break
            if r >= end and queued == 0:
                break
        counts[c] = kept
    _sum_parts(parts, out)
    return counts.sum()


@njit(parallel=True, cache=True)
def quantize_rows_q8(w, q, s):
    """Rows of w (n, dim) float32 -> int8 q (n, dim) and scales s (n, dim/32), symmetric per 32-block."""
    n, dim = w.shape
    for i in prange(n):
        for b in range(dim // QK):
            amax = np.float32(0.0)
            for k in range(b * QK, (b + 1) * QK):
                amax = max(amax, abs(w[i, k]))
            d = amax / np.float32(127.0)
            inv = np.float32(1.0) / d if d > 0 else np.float32(0.0)
            s[i, b] = d
            for k in range(b * QK, (b + 1) * QK):
                q[i, k] = np.int8(np.rint(w[i, k] * inv))


@njit(parallel=True, cache=True)
def quantize_rows_q4(w, q, s):
    """Rows of w (n, dim) float32 -> 4-bit q (n, dim/2) uint8 in Q4_0's nibble order and scales s
    (n, dim/32): as llama.cpp's Q4_0, d = (value of largest magnitude) / -8, q = clamp(round(x/d) + 8)."""
    n, dim = w.shape
    for i in prange(n):
        for b in range(dim // QK):
            big = np.float32(0.0)
            for k in range(b * QK, (b + 1) * QK):
                if abs(w[i, k]) > abs(big):
                    big = w[i, k]
            d = big / np.float32(-8.0)
            inv = np.float32(1.0) / d if d != 0 else np.float32(0.0)
            s[i, b] = d
            for j in range(16):
                lo = min(15, max(0, np.int32(np.rint(w[i, b * QK + j] * inv)) + 8))
                hi = min(15, max(0, np.int32(np.rint(w[i, b * QK + j + 16] * inv)) + 8))
                q[i, b * 16 + j] = np.uint8(lo | (hi << 4))


@njit(inline="always")
def _ids_above(z, t, idx):
    """The ids j with z[j] > t into idx, in order; returns the count."""
    n = 0
    for j in range(z.shape[0]):
        if z[j] > t:
            idx[n] = j
            n += 1
    return n


@njit(parallel=True, cache=True, fastmath=True)
def predict_active_cols(x, w1, rb1, qt1, vnni, q2t, d2, t, idx, parts):
    """PowerInfer's predictor for one token: h = relu(W1 x), z = W2 h, ids with z >= t into idx (the count is
    returned). x (1, dim); W1: r rows of rb1 bytes of type qt1 (GGUF row format), dotted as _row_dot does (x rounded
    to int8 blocks of 32 for quantized rows, as ggml's mul_mat rounds it for the 32-value types); W2 (n_ff, r) as its transpose
    q2t (r, n_ff) int8 with d2 (r/32, n_ff) the scale of each row's 32-block (exact for Q4_0, Q5_0 and Q8_0)."""
    r, n_ff = q2t.shape
    xq, xd, x8, xb, xt, xs = acts_forms(x)
    h = np.empty(r, np.float32)
    _rows_dot(w1, rb1, qt1, r, vnni, x, xq, xd, x8, xb, xt, xs, h)
    for k in range(r):
        h[k] = max(h[k], np.float32(0.0))
    z = np.empty(n_ff, np.float32)
    _axpy_columns(h, q2t, d2, z, parts)
    n = 0
    for j in range(n_ff):
        if z[j] >= t:
            idx[n] = j
            n += 1
    return n


@njit(inline="always")
def _axpy_columns(h, q2t, d2, z, parts):
    """z (n_ff,) = W2 h for W2 held as q2t (r, n_ff) int8 times d2 (nb, n_ff), the scale of each row's r/nb-value
    block: r axpys of h's values over each of `parts` contiguous runs of neurons, which vectorize (row dots of r = 64
    values cost a horizontal sum each: TinyLlama's shape, 44 us a call as row dots)."""
    r, n_ff = q2t.shape
    block = r // d2.shape[0]
    chunk = (n_ff + parts - 1) // parts
    for c in prange(parts):
        j0 = c * chunk
        j1 = min(n_ff, j0 + chunk)
        zz = z[j0:j1]
        zz[:] = 0.0
        acc = np.empty(j1 - j0, np.float32)
        for b in range(d2.shape[0]):
            acc[:] = 0.0
            for k in range(b * block, (b + 1) * block):
                hk = h[k]
                if hk != 0.0:
                    row = q2t[k, j0:j1]
                    for j in range(j1 - j0):
                        acc[j] += np.float32(row[j]) * hk
            d = d2[b, j0:j1]
            for j in range(j1 - j0):
                zz[j] += acc[j] * d[j]


@njit(inline="always")
def _rows_dot(w, rb, qt, rows, vnni, x, xq, xd, x8, xb, xt, xs, out):
    """out[j] = row j of w . x for j < rows, over contiguous runs of rows, one per worker (each its own scratch)."""
    parts = 8
    chunk = (rows + parts - 1) // parts
    for c in prange(parts):
        scratch = np.empty(x.shape[1], np.float32)
        for j in range(c * chunk, min(rows, (c + 1) * chunk)):
            out[j] = _row_dot(w, j * rb, qt, vnni, x, xq, xd, x8, xb, xt, xs, scratch)


@njit(parallel=True, cache=True, fastmath=True)
def predict_active_i8(x, q1, s1, b1, q2t, s2, b2, t, idx, parts):
    """Neurons a low-rank predictor calls active for one token: z = W2 relu(W1 x + b1) + b2, kept where z > t;
    idx receives the ids, the count is returned. x (dim,); W1, W2 as int8 with a float32 scale per output row,
    q1 (r, dim) row-per-output, q2t (r, n_ff) the transpose of W2's int8 rows with s2 (1, n_ff) their scales: the
    second stage is _axpy_columns' vectorized axpys (TinyLlama's shape, r = 64: 24 us a call, 50 as row dots)."""
    r, n_ff = q1.shape[0], q2t.shape[1]
    h = np.empty(r, np.float32)
    for k in prange(r):
        acc = np.float32(0.0)
        for i in range(x.shape[0]):
            acc += np.float32(q1[k, i]) * x[i]
        h[k] = max(acc * s1[k] + b1[k], np.float32(0.0))
    z = np.empty(n_ff, np.float32)
    _axpy_columns(h, q2t, s2, z, parts)
    for j in range(n_ff):
        z[j] += b2[j]
    return _ids_above(z, t, idx)
