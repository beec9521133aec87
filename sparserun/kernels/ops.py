"""numba kernels for the non-matmul parts of a transformer block (float32 throughout)."""
import math

import numpy as np
from numba import njit, prange

from .simd import f32_from_bits


@njit(cache=True, inline="always", fastmath=True)
def fast_exp(x):
    """exp(x) for float32 x, within 1.2e-7 relative of the exact value on [-87, 88] (inputs are clamped to it):
    2**n * p(r) with n = round(x / ln 2), r = x - n ln 2 (in two parts, |r| <= ln2/2) and Cephes' polynomial p.
    Plain arithmetic and a bit cast, so loops over it vectorize: 0.42 ns an element against 2.4 ns for libm's
    expf (the softmax of a 1000-token attention spent ~40% of its time in exp)."""
    x = min(max(x, np.float32(-87.0)), np.float32(88.0))
    y = x * np.float32(1.44269504)
    k = np.int32(y + np.float32(0.5) if y >= 0 else y - np.float32(0.5))  # round(y): a select, no libm call
    n = np.float32(k)
    r = x - n * np.float32(0.693359375) + n * np.float32(2.12194440e-4)
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    p = p * r * r + r + np.float32(1.0)
    return p * f32_from_bits((k + np.int32(127)) << np.int32(23))


@njit(cache=True, fastmath=True)
def rmsnorm(x, w, eps, out):
    """out[t] = x[t] / rms(x[t]) * w   x, out: (T, n); w: (n,). The sum of squares in float64 (as ggml), in
    any order (fastmath: the loop vectorizes)."""
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
            e = fast_exp(scores[j] - mx)
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
    """act(a) for one float32; act: 0 silu, 1 relu, 2 gelu (tanh form; 1 + tanh(z) = 2 - 2 / (exp(2z) + 1))."""
    if act == 0:
        return a / (np.float32(1.0) + fast_exp(-a))
    if act == 1:
        return a if a > 0 else np.float32(0.0)
    z = np.float32(0.7978845608) * (a + np.float32(0.044715) * a * a * a)
    return a - a / (fast_exp(np.float32(2.0) * z) + np.float32(1.0))


@njit(cache=True, inline="always")
def activate_row(src, act, out):
    """out[i] = act(src[i]) over a contiguous row, one loop per activation so each vectorizes. Callers compile
    with fastmath and error_model="numpy": numba's default Python error model puts a zero check on every float
    division, which kept the SiLU loop scalar (5632 values: 23 -> 2.3 us)."""
    n = src.shape[0]
    if act == 0:
        for i in range(n):
            out[i] = src[i] / (np.float32(1.0) + fast_exp(-src[i]))
    elif act == 1:
        for i in range(n):
            out[i] = max(src[i], np.float32(0.0))
    else:
        for i in range(n):
            out[i] = activate(src[i], act)


@njit(cache=True, fastmath=True, error_model="numpy")
def ffn_activate(g, u, act, out):
    """out = act(g) * u (gated FFN) or act(u) when g is empty (see activate for act)."""
    for t in range(out.shape[0]):
        o = out[t]
        if g.shape[0] == 0:
            activate_row(u[t], act, o)
        else:
            activate_row(g[t], act, o)
            ut = u[t]
            for i in range(o.shape[0]):
                o[i] *= ut[i]


@njit(cache=True)
def add_inplace(x, y):
    T, n = x.shape
    for t in range(T):
        for i in range(n):
            x[t, i] += y[t, i]
