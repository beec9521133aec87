"""teal's column kernels (teal.py: a column pack holds, per input channel, its weights for every output of the
matrices that read that input, in a down format of the neuron packs: 4-bit or int8 quants then an fp16 scale per 32
outputs). column_axpy adds a decode token's kept channels; column_matmul runs a prompt batch from the same packs, so
a matrix under teal needs no row-major copy (its rows are given back: weights.Weight.release). The axpys are the
sparse FFN's vpdpbusd ones on AVX512-VNNI CPUs and their generic-IR twins elsewhere (the same sums).
"""
import numpy as np
from numba import njit, prange

from .quant import HAS_VNNI, QK
from .simd import (EXACT_PREFETCH, axpy_i8_generic, axpy_i8_vnni, axpy_q4_exact_generic, axpy_q4_exact_vnni, axpy_q4_generic,
                   axpy_q4_vnni, coefs_q4_vnni, prefetch)
from .sparse import AXPY_GROUP, DOWN_Q4, _coef_scratch, _coefs_i8, _sum_parts


@njit(inline="always")
def _axpy8(acc, u, offs, co, nb, pf, down_kind):
    """acc += the 8 columns at u[offs[g]:] times their int8 coefficients co (coefs_q4_vnni), 4-bit or int8 columns:
    vpdpbusd where the CPU has it, else the same sums in generic IR."""
    if down_kind == DOWN_Q4:
        if HAS_VNNI:
            axpy_q4_vnni(acc, u, offs, co[0], co[1], co[2], nb, pf)
        else:
            axpy_q4_generic(acc, u, offs, co[0], co[1], co[2], nb, pf)
    elif HAS_VNNI:
        axpy_i8_vnni(acc, u, offs, co[0], co[1], co[2], nb, pf)
    else:
        axpy_i8_generic(acc, u, offs, co[0], co[1], co[2], nb, pf)

# How far ahead column_axpy prefetches, in kept columns. TinyLlama Q4_0's column packs at half the columns kept, 22
# layers from DRAM, 2 threads, measured when the threads split the outputs (GB/s of the kept units for no prefetch / 8 / 16 / 32 ahead): q|k|v 10 / 19 / 21 / 20,
# o 9 / 22 / 24 / 23, gate|up 19 / 28 / 28.5 / 28, down 10 / 17 / 22.5 / 22.5
COLUMN_AHEAD = 2 * AXPY_GROUP


@njit(inline="always")
def _kept(x, t, idx, coef):
    """A decode token's kept channels, those with |x[j]| > t: ids into idx, values into coef; returns their count."""
    n = 0
    # branch-free: every entry written at n, kept by counting it. A branch on channels kept at random mispredicts
    # about half the time: half of 5,632 channels of fresh inputs took 37.9 us that way, 4.2 us this way (2,048: 13.6
    # against 2.7); a TinyLlama teal token makes 88 such lists.
    for j in range(x.shape[0]):
        v = x[j]
        idx[n] = j
        coef[n] = v
        n += abs(v) > t
    return n


@njit(parallel=True, cache=True, fastmath=True)
def column_axpy(u, unit_bytes, down_kind, n_out, x, t, idx, coef, parts, out):
    """out (n_out,) = sum over the channels j with |x[j]| > t of x[j] * column j of a column pack (teal.py: unit j =
    input channel j's weights for every output, in a down format of 4-bit or int8 quants then fp16 scales per 32
    outputs), on VNNI CPUs; returns how many were kept (their ids in idx, values in coef: scratch of x's size).
    Threads split the kept columns: each reads whole units, one stream of 0.6-6.3 KB a column, into its own partial
    sum (parts: one row per thread, n_out wide), and the rows are added at the end. A/B against threads splitting the
    outputs (each reading its slice of every unit: 0.3-3.2 KB), TinyLlama Q4_0 at half the columns, one decode
    token's 88 calls from DRAM, alternating in one process, 8 processes: that form ran 10.6-11.6 ms in three and
    14.5-15.0 in five, this one 11.0-12.0 in all. Each axpy call prefetches the units COLUMN_AHEAD columns on, two
    lines per block; their scales at the group's start."""
    n = _kept(x, t, idx, coef)
    nbo = n_out // QK
    qbytes = nbo * (16 if down_kind == DOWN_Q4 else 32)  # a unit's quants, then its scales
    n_parts = parts.shape[0]
    chunk = (n + n_parts - 1) // n_parts
    for c in prange(n_parts):
        acc = parts[c]
        acc[:] = 0.0
        ahead = np.full(AXPY_GROUP, -1, np.int64)
        offs = np.empty(AXPY_GROUP, np.int64)
        h = np.empty(AXPY_GROUP, np.float32)
        co = _coef_scratch(nbo)
        j0, j1 = c * chunk, min(n, (c + 1) * chunk)
        for j in range(j0, j1, AXPY_GROUP):
            cnt = min(AXPY_GROUP, j1 - j)
            for g in range(AXPY_GROUP):
                k = j + COLUMN_AHEAD + g
                ahead[g] = idx[k] * unit_bytes if k < j1 else -1
                if ahead[g] >= 0:
                    prefetch(u, ahead[g] + qbytes, 2 * nbo)
                if g < cnt:
                    offs[g] = idx[j + g] * unit_bytes
                    h[g] = coef[j + g]
            _coefs_i8(u, offs, h, cnt, nbo, qbytes, co)
            _axpy8(acc, u, offs, co, nbo, ahead, down_kind)
    _sum_parts(parts, out)
    return n


# column_matmul's work items: a tile of output blocks (of 32) for a run of tokens. A tile's slice of every column
# (TILE_BLOCKS x 16 or 32 bytes, then its scales) stays in cache while the run's tokens add their kept columns into it.
# 16 blocks and more let coefs_q4_vnni take its vector path (16 blocks a vector). TinyLlama Q4_0, 64 tokens, half
# the channels kept, 22 layers, 2 threads, AVX2 (benchmarks/column_packs.py --batch 64), time against the dense
# batched matmuls of the same matrices, for 8 / 16 / 32 / 64 blocks: q|k|v 1.05 / 0.61 / 0.49 / 0.65x, o 1.09 / 0.52 /
# 0.46 / 0.42x, gate|up 1.13 / 0.53 / 0.47 / 0.47x, down 1.10 / 0.46 / 0.51 / 0.45x (64: 2 tiles of q|k|v's 80 blocks
# for 2 threads); runs of 8, 16 or 32 tokens alike.
TILE_BLOCKS = 32
TILE_TOKENS = 16


@njit(inline="always")
def _kept_lists(x, t, first, counts):
    """Each token's kept channels of a batch x (T, n_in) (|x[r, j]| > t; rows r < first: all), in order: (idx (T,
    n_in) int32, their values (T, n_in)); counts[r] = how many. Inlined into the parallel kernels: one token a
    thread."""
    T, n_in = x.shape
    idx = np.empty((T, n_in), np.int32)
    coef = np.empty((T, n_in), np.float32)
    for r in prange(T):
        n = 0
        for j in range(n_in):  # branch-free, as _kept
            v = x[r, j]
            idx[r, n] = j
            coef[r, n] = v
            n += r < first or abs(v) > t
        counts[r] = n
    return idx, coef


@njit(parallel=True, cache=True, fastmath=True)
def column_matmul(u, unit_bytes, down_kind, n_out, x, t, first, out, counts):
    """out (T, n_out) = the prompt batch x (T, n_in) times a column pack: token r adds x[r, j] * column j for its
    channels with |x[r, j]| > t (rows r < first: every channel, BOS); counts[r] = its kept channels. Each token's kept
    channels are listed once; each work item (an output tile and a run of tokens, see TILE_BLOCKS) then adds, token by
    token, the tile's slices of that token's kept columns, 8 at a time, as column_axpy does: the coefficients
    (coefs_q4_vnni: the values times the columns' block scales, rounded to int8 per block) and one axpy (_axpy8). The
    work is the kept share's, as in decode, and each column's slice is read from memory once for the run."""
    T = x.shape[0]
    idx, coef = _kept_lists(x, t, first, counts)
    nbo = n_out // QK
    qb = 16 if down_kind == DOWN_Q4 else 32  # quant bytes per block and column
    qbytes = nbo * qb
    n_tiles = (nbo + TILE_BLOCKS - 1) // TILE_BLOCKS
    n_runs = (T + TILE_TOKENS - 1) // TILE_TOKENS
    for item in prange(n_tiles * n_runs):
        tile, run = item // n_runs, item % n_runs  # a thread's items share tiles: their weights stay in L2
        b0 = tile * TILE_BLOCKS
        nb = min(TILE_BLOCKS, nbo - b0)
        offs_s = np.empty(AXPY_GROUP, np.int64)  # the columns' bytes from which coefs_q4_vnni finds this tile's scales
        offs_q = np.empty(AXPY_GROUP, np.int64)  # the tile's quants in each column
        pf = np.empty(AXPY_GROUP, np.int64)
        h = np.empty(AXPY_GROUP, np.float32)
        co = _coef_scratch(nb)
        for r in range(run * TILE_TOKENS, min(T, (run + 1) * TILE_TOKENS)):
            acc = out[r, QK * b0:QK * (b0 + nb)]
            acc[:] = 0.0
            n = counts[r]
            for j in range(0, n, AXPY_GROUP):
                cnt = min(AXPY_GROUP, n - j)
                for g in range(AXPY_GROUP):
                    base = np.int64(idx[r, j + g] if g < cnt else idx[r, j]) * unit_bytes
                    h[g] = coef[r, j + g] if g < cnt else np.float32(0.0)
                    offs_s[g] = base + 2 * b0
                    offs_q[g] = base + qb * b0
                    k = j + AXPY_GROUP + g  # the next group's slices, fetched while this one computes
                    pf[g] = np.int64(idx[r, k]) * unit_bytes + qb * b0 if k < n else -1
                coefs_q4_vnni(u, offs_s, h, nb, qbytes, co[0], co[1], co[2])
                _axpy8(acc, u, offs_q, co, nb, pf, down_kind)


# ---- exact 4-bit columns (teal.ColumnPack kind EXACT_Q4): a Q4_0 or Q4_K source's own nibbles, column by column
# (n_out / 2 bytes a unit, Q4_0's nibble order per 32 outputs), and per block of 32 input channels and output the
# source rows' scale s and offset m as fp16 (sc, mn: flat uint8, (n_in / 32, n_out) each): w = s (q - 8) - m. No
# second rounding: only the activations' (int8 per channel block, as a dense Q8_0 dot rounds them).
EXACT_BLOCK = 32  # input channels sharing one scale per output


@njit(inline="always")
def _exact_block(acc, u, unit_bytes, idx, coef, j0, j1, n_kept, o0, nb, sc, mn, has_m, blk, n_out, offs, cw, pf):
    """acc (nb x 32 outputs from output block o0) += the source rows' part for the kept channels idx[j0:j1] of channel
    block blk (values coef[j0:j1], at most EXACT_BLOCK): their int8 coefficients (one scale for the block, the same for
    every output) and one axpy_q4_exact of all of them, the scales applied once. The next channel block's kept channels
    (from idx[j1], up to n_kept) are prefetched. offs (EXACT_BLOCK,) int64, cw (EXACT_BLOCK / 4,) int32, pf
    (EXACT_PREFETCH,) int64: scratch."""
    amax = np.float32(0.0)
    xsum = np.float32(0.0)
    for j in range(j0, j1):
        amax = max(amax, abs(coef[j]))
        xsum += coef[j]
    if amax == 0.0:
        return
    inv = np.float32(127.0) / amax
    cnt = j1 - j0
    total = 0
    for quad in range((cnt + 3) // 4):
        word = 0
        for g4 in range(4):
            g = 4 * quad + g4
            qv = np.int64(np.rint(coef[j0 + g] * inv)) if g < cnt else 0
            offs[g] = np.int64(idx[j0 + g] if g < cnt else idx[j0]) * unit_bytes + 16 * o0
            total += qv
            word |= (qv & 255) << (8 * g4)
        cw[quad] = np.int32(word if word < 2 ** 31 else word - 2 ** 32)
    nxt = idx[j1] // EXACT_BLOCK if j1 < n_kept else -1
    for g in range(EXACT_PREFETCH):
        k = j1 + g
        pf[g] = np.int64(idx[k]) * unit_bytes + 16 * o0 if k < n_kept and idx[k] // EXACT_BLOCK == nxt else -1
    at = 2 * (blk * n_out + QK * o0)
    if HAS_VNNI:
        axpy_q4_exact_vnni(acc, u, offs, (cnt + 3) // 4, cw, np.int32(-8 * total), amax / np.float32(127.0), sc, at,
                           mn, at if has_m else -1, xsum, nb, pf)
    else:
        axpy_q4_exact_generic(acc, u, offs, (cnt + 3) // 4, cw, np.int32(-8 * total), amax / np.float32(127.0), sc,
                              at, mn, at if has_m else -1, xsum, nb, pf)


@njit(parallel=True, cache=True, fastmath=True)
def column_axpy_exact(u, unit_bytes, n_out, x, t, idx, coef, sc, mn, has_m, parts, out):
    """column_axpy over exact 4-bit columns: out (n_out,) = sum over the channels j with |x[j]| > t of x[j] * column
    j; returns how many were kept (ids in idx, values in coef). Threads split the channel blocks, each adding its
    blocks' kept columns into its own partial sum (parts)."""
    n = _kept(x, t, idx, coef)
    n_blk = (x.shape[0] + EXACT_BLOCK - 1) // EXACT_BLOCK
    start = np.zeros(n_blk + 1, np.int64)  # each channel block's first entry in idx
    for j in range(n):
        start[idx[j] // EXACT_BLOCK + 1] += 1
    for b in range(n_blk):
        start[b + 1] += start[b]
    nbo = n_out // QK
    n_parts = parts.shape[0]
    chunk = (n_blk + n_parts - 1) // n_parts
    for c in prange(n_parts):
        acc = parts[c]
        acc[:] = 0.0
        offs = np.empty(EXACT_BLOCK, np.int64)
        cw = np.empty(EXACT_BLOCK // 4, np.int32)
        pf = np.empty(EXACT_PREFETCH, np.int64)
        for b in range(c * chunk, min(n_blk, (c + 1) * chunk)):
            if start[b + 1] > start[b]:
                _exact_block(acc, u, unit_bytes, idx, coef, start[b], start[b + 1], n, 0, nbo, sc, mn, has_m, b, n_out,
                             offs, cw, pf)
    _sum_parts(parts, out)
    return n


@njit(parallel=True, cache=True, fastmath=True)
def column_matmul_exact(u, unit_bytes, n_out, x, t, first, sc, mn, has_m, out, counts):
    """column_matmul over exact 4-bit columns: out (T, n_out) = the prompt batch x (T, n_in), token r adding its
    channels with |x[r, j]| > t (rows r < first: every channel); counts[r] = its kept channels. Work items as
    column_matmul's (an output tile, a run of tokens), each token's kept channels taken a channel block at a time."""
    T = x.shape[0]
    idx, coef = _kept_lists(x, t, first, counts)
    nbo = n_out // QK
    n_tiles = (nbo + TILE_BLOCKS - 1) // TILE_BLOCKS
    n_runs = (T + TILE_TOKENS - 1) // TILE_TOKENS
    for item in prange(n_tiles * n_runs):
        tile, run = item // n_runs, item % n_runs
        b0 = tile * TILE_BLOCKS
        nb = min(TILE_BLOCKS, nbo - b0)
        offs = np.empty(EXACT_BLOCK, np.int64)
        cw = np.empty(EXACT_BLOCK // 4, np.int32)
        pf = np.empty(EXACT_PREFETCH, np.int64)
        for r in range(run * TILE_TOKENS, min(T, (run + 1) * TILE_TOKENS)):
            acc = out[r, QK * b0:QK * (b0 + nb)]
            acc[:] = 0.0
            n = counts[r]
            ids, cs = idx[r], coef[r]
            j0 = 0
            while j0 < n:
                blk = ids[j0] // EXACT_BLOCK
                j1 = j0 + 1
                while j1 < n and ids[j1] // EXACT_BLOCK == blk:
                    j1 += 1
                _exact_block(acc, u, unit_bytes, ids, cs, j0, j1, n, b0, nb, sc, mn, has_m, blk, n_out, offs, cw, pf)
                j0 = j1
