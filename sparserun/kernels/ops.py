"""numba kernels for the non-matmul parts of a transformer block (float32 throughout)."""
import math

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from .simd import f32_from_bits, half_bits, load_f16


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


KV_TYPES = {"f16": np.uint16, "f32": np.float32}  # a KV cache's element type: IEEE half bits (llama.cpp's
# default; numba has no float16 arrays) or float32


def kv_get(c, g, j, d):
    """Element [g, j, d] of a KV cache as float32 (for kernels; see the overload below)."""
    raise NotImplementedError


def kv_put(c, g, j, d, x):
    """Store float32 x at [g, j, d] of a KV cache, rounded to the cache's type (for kernels)."""
    raise NotImplementedError


@overload(kv_get, inline="always")
def _kv_get(c, g, j, d):
    if c.dtype == types.uint16:
        return lambda c, g, j, d: load_f16(c, ((g * c.shape[1] + j) * c.shape[2] + d) * 2)
    return lambda c, g, j, d: c[g, j, d]


@overload(kv_put, inline="always")
def _kv_put(c, g, j, d, x):
    if c.dtype == types.uint16:
        def put(c, g, j, d, x):
            c[g, j, d] = half_bits(x)
        return put

    def put32(c, g, j, d, x):
        c[g, j, d] = x
    return put32


@njit(cache=True)
def store_kv(k, v, kc, vc, pos0):
    """Write T new tokens' keys and values (T, n_kv*head_dim) into one layer's cache kc, vc (n_kv, n_ctx, head_dim)
    of a KV_TYPES type at positions pos0..pos0+T-1."""
    T = k.shape[0]
    n_kv, _, hd = kc.shape
    for t in range(T):
        for g in range(n_kv):
            for d in range(hd):
                kv_put(kc, g, pos0 + t, d, k[t, g * hd + d])
                kv_put(vc, g, pos0 + t, d, v[t, g * hd + d])


def attention(q, kc, vc, pos0, n_head, threads, out):
    """Causal GQA attention for T new tokens at positions pos0.. against one layer's cache.

    q: (T, n_head*head_dim); kc, vc: (n_kv, n_ctx, head_dim) of a KV_TYPES type, positions [0, pos0+T) filled
    (store_kv); out: (T, n_head*head_dim). Query head h reads kv head h // (n_head / n_kv), as llama.cpp. threads:
    those the parallel loop runs on (numba.get_num_threads() inside a kernel would keep numba from caching it).
    Runs a kernel compiled for this head_dim (_attention_kernel)."""
    hd = kc.shape[2]
    kernel = _ATTENTION.get(hd)
    if kernel is None:
        kernel = _ATTENTION[hd] = _attention_kernel(hd)
    kernel(q, kc, vc, pos0, n_head, threads, out)


_ATTENTION = {}  # head_dim -> its kernel


def _attention_kernel(HD):
    """The attention kernel for head_dim HD, a compile-time constant: its row dots unroll fully (TinyLlama's 64:
    1.33x faster than with the width read at run time, 22 layers at position 1000 from DRAM).

    One work item is a token and a kv head with all of its query heads (or a share of them where there are
    fewer tokens times kv heads than threads): each key and value row is read from memory once for the group,
    and the cache keeps each kv head's rows contiguous, one stream. Loops index arrays directly, innermost by a
    bare range variable and with no views inside them: a view costs reference-count atomics, and an index numba
    cannot prove non-negative gets a wraparound select that stops vectorization. Against the previous kernel
    (one query head per item over a (n_ctx, kv_dim) float32 cache, with row views), TinyLlama's 22 layers of
    decode attention at position 1000, cache not in L3: 8.6-9.0 -> 3.1 ms (float32 cache, width at run time)."""
    @njit(parallel=True, cache=True, fastmath=True)
    def attention_hd(q, kc, vc, pos0, n_head, threads, out):
        T = q.shape[0]
        n_kv = kc.shape[0]
        G = n_head // n_kv  # query heads per kv head
        S = 1  # shares a group's query heads are split into: enough items for the threads, each a divisor of G
        while T * n_kv * S < threads and G % (2 * S) == 0:
            S *= 2
        H = G // S  # query heads per item
        scale = np.float32(1.0 / math.sqrt(HD))
        q3 = q.reshape(T, n_head, HD)
        o3 = out.reshape(T, n_head, HD)
        for item in prange(T * n_kv * S):
            t, g, h0 = item // (n_kv * S), (item // S) % n_kv, (item % S) * H
            n_keys = pos0 + t + 1
            qs = np.empty((H, HD), np.float32)  # the item's queries, scaled
            for h in range(H):
                for d in range(HD):
                    qs[h, d] = q3[t, g * G + h0 + h, d] * scale
            s = np.empty((H, n_keys), np.float32)  # scores, then softmax numerators
            for j in range(n_keys):
                for h in range(H):
                    a = np.float32(0.0)
                    for d in range(HD):
                        a += qs[h, d] * kv_get(kc, g, j, d)
                    s[h, j] = a
            inv = np.empty(H, np.float32)
            for h in range(H):
                mx = np.float32(-np.inf)
                for j in range(n_keys):
                    mx = max(mx, s[h, j])
                total = np.float32(0.0)
                for j in range(n_keys):
                    e = fast_exp(s[h, j] - mx)
                    s[h, j] = e
                    total += e
                inv[h] = np.float32(1.0) / total
            acc = np.zeros((H, HD), np.float32)
            for j in range(n_keys):
                for h in range(H):
                    w = s[h, j]
                    for d in range(HD):
                        acc[h, d] += w * kv_get(vc, g, j, d)
            for h in range(H):
                for d in range(HD):
                    o3[t, g * G + h0 + h, d] = acc[h, d] * inv[h]

    return attention_hd


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
