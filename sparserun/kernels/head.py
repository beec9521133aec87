"""Kernels of the hot/cold output head (sparserun/head.py): the cold rows' low-rank estimate written into the
logits, the cold rows of the largest estimates, and those rows' exact dots."""
import numpy as np
from numba import njit, prange

from .simd import TILE_ROWS, dot_tile_q4_0_generic, dot_tile_q4_0_vnni, prefetch  # noqa: F401 (TILE_ROWS: head.py reads it here)
from .sparse import _row_dot


ROW_RUNS = 64  # runs of rows the threads share out (many per thread: rows cost alike, the runs even out the ends)


def tile_q4_0(codes):
    """Q4_0 rows (n, nb * 18) -> tiles of TILE_ROWS rows (ceil(n / 8), nb * 144), zero rows padding the last: per
    block, the 8 rows' fp16 scales, then their 16 quant bytes each (simd.dot_tile_q4_0_vnni reads a block of 8 rows
    at once). The same bytes per row."""
    n, rb = codes.shape
    nb, nt = rb // 18, -(-n // TILE_ROWS)
    pad = np.zeros((nt * TILE_ROWS, rb), np.uint8)
    pad[:n] = codes
    blocks = pad.reshape(nt, TILE_ROWS, nb, 18).transpose(0, 2, 1, 3)  # (tile, block, row, 18)
    scales = blocks[..., :2].reshape(nt, nb, 2 * TILE_ROWS)
    quants = blocks[..., 2:].reshape(nt, nb, 16 * TILE_ROWS)
    return np.ascontiguousarray(np.concatenate([scales, quants], axis=2).reshape(nt, nb * 18 * TILE_ROWS))


@njit(parallel=True, cache=True)
def estimate(tiles, tile_ids, nb, vnni, z8, zd, bias, logits):
    """logits[8 t + k] = A_{8 t + k} . z for the rows of the tiles t in tile_ids (k < 8, rows past the vocabulary's end
    dropped): tiles (len(tile_ids), nb * 144) those rows of A as Q4_0 tiles (tile_q4_0), z8 / zd (one token's) the
    basis coordinates as int8 blocks and their scales (quant.quantize_acts), bias (nb,) int32 per block -8 times the
    sum of z8's values (Q4_0's offset). Integer block dots, 8 rows a call, stored in place (simd.dot_tile_q4_0_vnni
    or its generic twin); the logits of other tiles are left as they are."""
    nt, tb = tiles.shape
    n = logits.shape[0]
    flat = tiles.reshape(-1)
    full = n // TILE_ROWS  # tiles whose 8 rows all lie in logits; the last one, if partial, goes through tail
    for c in prange(ROW_RUNS):
        tail = np.empty(TILE_ROWS, np.float32)
        for i in range(c * nt // ROW_RUNS, (c + 1) * nt // ROW_RUNS):
            t = tile_ids[i]
            out, at = (logits, t * TILE_ROWS) if t < full else (tail, 0)
            if vnni:
                dot_tile_q4_0_vnni(flat, i * tb, nb, z8, zd, bias, out, at)
            else:
                dot_tile_q4_0_generic(flat, i * tb, nb, z8, zd, bias, out, at)
            if t >= full:
                for j in range(t * TILE_ROWS, n):
                    logits[j] = tail[j - t * TILE_ROWS]


EXACT_AHEAD = 4  # rows exact_rows prefetches ahead (Gemma 3 270M in decode, ~2,500 rows a token: none 0.52 ms, 2 0.38, 4 and 8 0.32)


@njit(parallel=True, cache=True)
def exact_rows(raw, row_bytes, qtype, vnni, ids, x, xq, xd, x8, xb, xt, xs, logits):
    """logits[ids[j]] = W[ids[j]] . x for one token: the head's rows dotted where they lie (raw, GGUF rows of qtype),
    with the token's activations and their int8 forms (quant.acts_forms), as the sparse FFN dots its rows."""
    n = ids.shape[0]
    parts = min(8, max(1, n))
    for c in prange(parts):
        scratch = np.empty(x.shape[1], np.float32)
        end = (c + 1) * n // parts
        for j in range(c * n // parts, end):
            if j + EXACT_AHEAD < end:  # scattered rows: no hardware prefetcher stream runs ahead of them
                prefetch(raw, ids[j + EXACT_AHEAD] * row_bytes, row_bytes)
            logits[ids[j]] = _row_dot(raw, ids[j] * row_bytes, qtype, vnni, x, xq, xd, x8, xb, xt, xs, scratch)


PARTS = 4  # slices of the vocabulary scanned in parallel by top_rows
SAMPLE = 1024  # candidates sampled (strided) to set top_rows' threshold


@njit(parallel=True, cache=True)
def top_rows(vals, mask, n_mask, m, out):
    """The indices j of the largest vals[j] among those with mask[j] (n_mask of them), at least min(m, n_mask) and
    at most 3m of them, into out (room for 3m), in no particular order; returns their count. One pass (parallel over
    slices) keeps every masked value above a threshold from a strided sample of SAMPLE values, set for about 1.25m:
    those are the largest, and no ranking is needed. Where the sample misjudged the threshold is moved and the pass
    repeated: lowered below m, raised above 3m."""
    n = vals.shape[0]
    m = min(m, n_mask)
    stride = max(1, n // SAMPLE)
    sample = np.empty(n // stride + 1, np.float32)
    ns = 0
    for i in range(0, n, stride):
        if mask[i]:
            sample[ns] = vals[i]
            ns += 1
    sample = np.sort(sample[:ns])[::-1]
    per = (n + PARTS - 1) // PARTS
    cand = np.empty((PARTS, per), np.int64)  # room for a whole slice: a low threshold cannot overflow it
    counts = np.zeros(PARTS, np.int64)
    lo, hi = -1, ns  # sample ranks known to keep too many / too few
    q = min(ns - 1, 5 * m * ns // max(1, 4 * n_mask))  # the sample's q-th largest leaves about 1.25m rows above it
    while True:
        t = sample[q] if 0 <= q < ns else -np.inf
        for p in prange(PARTS):
            c = 0
            for j in range(p * per, min(n, (p + 1) * per)):
                if mask[j] and vals[j] >= t:
                    cand[p, c] = j
                    c += 1
            counts[p] = c
        total = counts.sum()
        if total < m and q < ns:
            lo = q
            q = min(ns, 2 * q + 1) if hi == ns else (q + hi) // 2 + 1
        elif total > 3 * m and q > lo + 1:
            hi = q
            q = (lo + q) // 2
        else:
            break
    c = 0
    for p in range(PARTS):
        k = min(counts[p], 3 * m - c)
        out[c:c + k] = cand[p, :k]
        c += k
    return c


@njit(cache=True)
def exact_set(cand, n, ctx, upto, is_cold, mark, out):
    """out[:count] = cand[:n] and the cold tokens of ctx[:upto] (a row's context) not among them, each once; returns
    count. mark (V,) uint8 zeros, left as found."""
    c = 0
    for i in range(n):
        mark[cand[i]] = 1
        out[c] = cand[i]
        c += 1
    for i in range(upto):
        j = ctx[i]
        if 0 <= j < mark.shape[0] and is_cold[j] and mark[j] == 0:
            mark[j] = 1
            out[c] = j
            c += 1
    for i in range(c):
        mark[out[i]] = 0
    return c


@njit(cache=True)
def scatter(values, rows, logits):
    """logits[rows[j]] = values[j]."""
    for j in range(rows.shape[0]):
        logits[rows[j]] = values[j]


@njit(cache=True, fastmath=True)
def matvec(w, x, out):
    """out = w @ x for a small float32 matrix (the basis projection, the exact rows' dots). numpy would call BLAS,
    whose threads then spin beside numba's on the same cores: on 2 cores every matmul of the model ran 2.7x slower."""
    for i in range(w.shape[0]):
        acc = np.float32(0.0)
        for j in range(w.shape[1]):
            acc += w[i, j] * x[j]
        out[i] = acc
