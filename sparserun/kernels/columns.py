"""teal's column kernels (teal.py: a column pack holds, per input channel, its weights for every output of the
matrices that read that input, in a down format of the neuron packs: 4-bit or int8 quants then an fp16 scale per 32
outputs). column_axpy adds a decode token's kept channels; column_matmul runs a prompt batch from the same packs, so
a matrix under teal needs no row-major copy (its rows are given back: weights.Weight.release). The axpys are the
sparse FFN's vpdpbusd ones on AVX512-VNNI CPUs and their generic-IR twins elsewhere (the same sums).
"""
import numpy as np
from numba import njit, prange

from .quant import HAS_VNNI, QK
from .simd import axpy_i8_generic, axpy_i8_vnni, axpy_q4_generic, axpy_q4_vnni, coefs_q4_vnni, prefetch
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
    n = 0
    for j in range(x.shape[0]):
        if abs(x[j]) > t:
            idx[n] = j
            coef[n] = x[j]
            n += 1
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
# (TILE_BLOCKS x 16 or 32 bytes, then its scales) is read once per run of tokens; the run's partial sums
# (TILE_TOKENS x TILE_BLOCKS x 32 floats) stay in L1, and the tile's weights in L2 between runs (A/B below).
TILE_BLOCKS = 8
TILE_TOKENS = 8


@njit(parallel=True, cache=True, fastmath=True)
def column_matmul(u, unit_bytes, down_kind, n_out, x, t, first, out, counts):
    """out (T, n_out) = the prompt batch x (T, n_in) times a column pack: token r adds x[r, j] * column j
    for its channels with |x[r, j]| > t (rows r < first: every channel, BOS); counts[r] = its kept channels. Each
    work item (an output tile and a run of tokens, see TILE_BLOCKS) walks the columns 8 at a time: the 8 columns'
    coefficients for each token (coefs_q4_vnni: the token's values times the columns' block scales, rounded to int8
    per block) and one axpy of the tile's quants (_axpy8, the decode kernel's); a group whose 8
    values a token drops entirely is skipped for that token."""
    T, n_in = x.shape
    for r in range(T):
        n = 0
        for j in range(n_in):
            if r < first or abs(x[r, j]) > t:
                n += 1
        counts[r] = n
    nbo = n_out // QK
    qb = 16 if down_kind == DOWN_Q4 else 32  # quant bytes per block and column
    qbytes = nbo * qb
    n_tiles = (nbo + TILE_BLOCKS - 1) // TILE_BLOCKS
    n_runs = (T + TILE_TOKENS - 1) // TILE_TOKENS
    for item in prange(n_tiles * n_runs):
        tile, run = item // n_runs, item % n_runs  # a thread's items share tiles: their weights stay in L2
        b0 = tile * TILE_BLOCKS
        nb = min(TILE_BLOCKS, nbo - b0)
        r0, r1 = run * TILE_TOKENS, min(T, (run + 1) * TILE_TOKENS)
        for r in range(r0, r1):
            out[r, QK * b0:QK * (b0 + nb)] = 0.0
        offs_s = np.empty(AXPY_GROUP, np.int64)  # the columns' bytes from which coefs_q4_vnni finds this tile's scales
        offs_q = np.empty(AXPY_GROUP, np.int64)  # the tile's quants in each column
        pf = np.full(AXPY_GROUP, -1, np.int64)
        no_pf = np.full(AXPY_GROUP, -1, np.int64)
        h = np.empty(AXPY_GROUP, np.float32)
        co = _coef_scratch(nb)
        for j in range(0, n_in, AXPY_GROUP):
            cnt = min(AXPY_GROUP, n_in - j)
            for g in range(AXPY_GROUP):
                base = (j + g if g < cnt else j) * unit_bytes
                offs_s[g] = base + 2 * b0
                offs_q[g] = base + qb * b0
                k = j + AXPY_GROUP + g  # the next group's slices, fetched while this one computes
                pf[g] = k * unit_bytes + qb * b0 if k < n_in else -1
            fetch = True
            for r in range(r0, r1):
                kept = False
                for g in range(AXPY_GROUP):
                    v = x[r, j + g] if g < cnt else np.float32(0.0)
                    if r >= first and abs(v) <= t:
                        v = np.float32(0.0)
                    h[g] = v
                    kept = kept or v != 0.0
                if not kept:
                    continue
                coefs_q4_vnni(u, offs_s, h, nb, qbytes, co[0], co[1], co[2])
                _axpy8(out[r, QK * b0:QK * (b0 + nb)], u, offs_q, co, nb, pf if fetch else no_pf, down_kind)
                fetch = False
