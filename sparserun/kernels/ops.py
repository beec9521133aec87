"""numba kernels for the non-matmul parts of a transformer block (float32 throughout)."""
import math

import numpy as np
from numba import njit, prange


@njit(cache=True)
def rmsnorm(x, w, eps, out):
    """out[t] = x[t] / rms(x[t]) * w   x, out: (T, n); w: (n,)"""
    T, n = x.shape
    for t in range(T):
        ss = 0.0
        for i in range(n):
            ss += x[t, i] * x[t, i]
        s = np.float32(1.0 / math.sqrt(ss / n + eps))
        for i in range(n):
            out[t, i] = x[t, i] * s * w[i]


@njit(cache=True)
def rope(x, pos0, n_heads, head_dim, rope_dim, inv_freq, neox):
    """Rotate each head of x (T, n_heads*head_dim) in place; token t is at position pos0 + t.

    Pairs are (2i, 2i+1) in llama.cpp's normal mode and (i, i + rope_dim/2) in NeoX mode; only the
    first rope_dim dimensions of a head rotate.
    """
    T = x.shape[0]
    half = rope_dim // 2
    for t in range(T):
        p = pos0 + t
        for i in range(half):
            theta = p * inv_freq[i]
            c, s = np.float32(math.cos(theta)), np.float32(math.sin(theta))
            for h in range(n_heads):
                base = h * head_dim
                a, b = (base + i, base + i + half) if neox else (base + 2 * i, base + 2 * i + 1)
                x0, x1 = x[t, a], x[t, b]
                x[t, a] = x0 * c - x1 * s
                x[t, b] = x0 * s + x1 * c


@njit(parallel=True, cache=True, fastmath=True)
def attention(q, kc, vc, pos0, n_head, n_head_kv, head_dim, out):
    """Causal GQA attention for T new tokens at positions pos0.. against the cache.

    q: (T, n_head*head_dim); kc, vc: (n_ctx, n_head_kv*head_dim), rows [0, pos0+T) filled;
    out: (T, n_head*head_dim).
    """
    T = q.shape[0]
    group = n_head // n_head_kv
    scale = np.float32(1.0 / math.sqrt(head_dim))
    for th in prange(T * n_head):
        t, h = th // n_head, th % n_head
        n_keys = pos0 + t + 1
        qo, ko = h * head_dim, (h // group) * head_dim
        qv = q[t, qo:qo + head_dim]  # 1-D contiguous views keep the inner loops vectorizable
        o = out[t, qo:qo + head_dim]
        scores = np.empty(n_keys, np.float32)
        mx = np.float32(-np.inf)
        for j in range(n_keys):
            kv = kc[j, ko:ko + head_dim]
            s = np.float32(0.0)
            for d in range(head_dim):
                s += qv[d] * kv[d]
            s *= scale
            scores[j] = s
            mx = max(mx, s)
        total = np.float32(0.0)
        for j in range(n_keys):
            e = np.float32(math.exp(scores[j] - mx))
            scores[j] = e
            total += e
        o[:] = 0.0
        inv = np.float32(1.0) / total
        for j in range(n_keys):
            wj = scores[j] * inv
            vv = vc[j, ko:ko + head_dim]
            for d in range(head_dim):
                o[d] += wj * vv[d]


@njit(cache=True, inline="always")
def activate(a, act):
    """act(a) for one float32; act: 0 silu, 1 relu, 2 gelu (tanh form)."""
    if act == 0:
        return a / (np.float32(1.0) + np.float32(math.exp(-a)))
    if act == 1:
        return a if a > 0 else np.float32(0.0)
    return np.float32(0.5) * a * (np.float32(1.0) + np.float32(math.tanh(0.7978845608 * (a + 0.044715 * a * a * a))))


@njit(cache=True)
def ffn_activate(g, u, act, out):
    """out = act(g) * u (gated FFN) or act(u) when g is empty (see activate for act)."""
    T, n = out.shape
    gated = g.shape[0] > 0
    for t in range(T):
        for i in range(n):
            a = activate(g[t, i] if gated else u[t, i], act)
            out[t, i] = a * u[t, i] if gated else a


@njit(cache=True)
def add_inplace(x, y):
    T, n = x.shape
    for t in range(T):
        for i in range(n):
            x[t, i] += y[t, i]
