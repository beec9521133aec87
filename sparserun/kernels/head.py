"""Kernels of the hot/cold output head (sparserun/head.py): the cold rows' low-rank estimate written into the
logits, and the cold rows of the largest estimates."""
import numpy as np
from numba import njit, prange


@njit(parallel=True, cache=True, fastmath=True)
def estimate(a, scale, z, rows, est, logits):
    """est[j] = logits[rows[j]] = scale[j] * (a[j] . z) for every cold row j: a (n_cold, r) int8 stored row by row (a
    row's r values in one or two vector loads; the int8 -> float dots run at the memory's speed), z (r,) the token's
    hidden state on the estimate's basis, rows (n_cold,) the rows' vocabulary ids (ascending: the writes stream)."""
    n, r = a.shape
    for j in prange(n):
        acc = np.float32(0.0)
        for q in range(r):
            acc += np.float32(a[j, q]) * z[q]
        v = acc * scale[j]
        est[j] = v
        logits[rows[j]] = v


@njit(cache=True)
def _ranked(est, cand, c, rows, m, out):
    """The m largest of est[cand[:c]], as vocabulary ids rows[...], into out[:m]."""
    vals = np.empty(c, np.float32)
    for i in range(c):
        vals[i] = -est[cand[i]]
    order = np.argsort(vals)
    for i in range(m):
        out[i] = rows[cand[order[i]]]
    return m


PARTS = 4  # slices of the cold rows scanned in parallel by top_rows


@njit(parallel=True, cache=True)
def top_rows(est, rows, m, out):
    """The vocabulary ids (rows[j]) of the m largest est[j] into out[:m], in no particular order; returns
    min(m, len(est)). A threshold from a strided sample keeps about 2m candidates in one contiguous pass (parallel
    over slices) and only those are ranked; where the sample misjudged (fewer than m above it) the threshold is
    lowered and the pass repeated."""
    n = est.shape[0]
    if m >= n:
        out[:n] = rows
        return n
    stride = max(1, n // (16 * m))
    ns = (n + stride - 1) // stride
    sample = np.empty(ns, np.float32)
    for i in range(ns):
        sample[i] = est[i * stride]
    sample = np.sort(sample)[::-1]
    per = (n + PARTS - 1) // PARTS
    cand = np.empty((PARTS, per), np.int64)  # room for a whole slice: a low threshold cannot overflow it
    counts = np.zeros(PARTS, np.int64)
    q = 2 * m // stride + 1  # the sample's q-th largest leaves about 2m rows above it
    while True:
        t = sample[min(ns - 1, q)]
        for p in prange(PARTS):
            c = 0
            for j in range(p * per, min(n, (p + 1) * per)):
                if est[j] >= t:
                    cand[p, c] = j
                    c += 1
            counts[p] = c
        total = counts.sum()
        if total >= m or q >= ns - 1:
            break
        q *= 4  # the sample misjudged: lower the threshold
    flat = np.empty(total, np.int64)
    c = 0
    for p in range(PARTS):
        flat[c:c + counts[p]] = cand[p, :counts[p]]
        c += counts[p]
    return _ranked(est, flat, total, rows, m, out)


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
