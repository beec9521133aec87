"""numba.cuda kernels of the hybrid (imported only when a GPU path is used; NUMBA_ENABLE_CUDASIM=1 runs them on
the CPU for the tests). One thread per output value; matrices are laid out so the threads of a warp read
adjacent addresses (coalesced): a matvec's weight is stored transposed (cols, rows), so thread r reading
column r at step k sits next to thread r+1; the down projection is stored neuron-major (n_hot, dim), so the
threads d of one token read one neuron's row together and skip it together when the neuron is zero.
Weights are float32 or float16 (as placed), always accumulated in float32.
"""
import math

from numba import cuda, float32

THREADS = 128  # threads per block along the output dimension


@cuda.jit
def matvec_t(wt, x, out):
    """out[t, r] = sum_k wt[k, r] * x[t, k]: wt (cols, rows), x (T, cols), out (T, rows)."""
    r, t = cuda.grid(2)
    if r < wt.shape[1] and t < x.shape[0]:
        acc = float32(0.0)
        for k in range(wt.shape[0]):
            acc += float32(wt[k, r]) * x[t, k]
        out[t, r] = acc


@cuda.jit(device=True)
def activate(a, act):
    """0 silu, 1 relu, 2 gelu (tanh form), 3 relu (relu_sym): the CPU's ops.ffn_activate."""
    if act == 0:
        return a / (float32(1.0) + float32(math.exp(-a)))
    if act == 1 or act == 3:
        return a if a > 0 else float32(0.0)
    return float32(0.5) * a * (float32(1.0) + float32(math.tanh(float32(0.7978845608) * (a + float32(0.044715) * a * a * a))))


@cuda.jit
def hot_ffn_in(gt, ut, x, gated, act, thr, mask, use_mask, h):
    """h[t, j] for hot neuron j: act(gate_j . x_t) * (up_j . x_t) (gated) or act(up_j . x_t), zero when the
    neuron is dropped: |act| <= thr (thr < 0 keeps all), or, with use_mask, mask[t, j] == 0 (a predictor said
    inactive: then neither row is read). gt, ut (dim, n_hot); x (T, dim); h (T, n_hot)."""
    j, t = cuda.grid(2)
    if j < ut.shape[1] and t < x.shape[0]:
        if use_mask and mask[t, j] == 0:
            h[t, j] = 0.0
            return
        u = float32(0.0)
        g = float32(0.0)
        for k in range(x.shape[1]):
            xv = x[t, k]
            u += float32(ut[k, j]) * xv
            if gated:
                g += float32(gt[k, j]) * xv
        a = activate(g if gated else u, act)
        if abs(a) <= thr:
            h[t, j] = 0.0
        else:
            h[t, j] = a * (max(u, float32(0.0)) if act == 3 else u) if gated else a


@cuda.jit
def hot_ffn_out(dn, h, y):
    """y[t, d] = sum_j h[t, j] * dn[j, d]: dn (n_hot, dim) neuron-major; zero neurons are skipped."""
    d, t = cuda.grid(2)
    if d < dn.shape[1] and t < h.shape[0]:
        acc = float32(0.0)
        for j in range(dn.shape[0]):
            hv = h[t, j]
            if hv != 0.0:
                acc += hv * float32(dn[j, d])
        y[t, d] = acc


def grid(n, T):
    """(blocks, threads) for a (n outputs, T tokens) launch."""
    return ((n + THREADS - 1) // THREADS, T), (THREADS, 1)


@cuda.jit
def rope(x, pos0, n_heads, head_dim, rope_dim, inv_freq, neox):
    """kernels.ops.rope on the device: rotate pair i of head h of token t (at position pos0 + t) in place."""
    i, th = cuda.grid(2)
    half = rope_dim // 2
    if i < half and th < x.shape[0] * n_heads:
        t, h = th // n_heads, th % n_heads
        theta = (pos0 + t) * float(inv_freq[i])
        c, s = float32(math.cos(theta)), float32(math.sin(theta))
        base = h * head_dim
        a = base + i if neox else base + 2 * i
        b = base + i + half if neox else base + 2 * i + 1
        x0, x1 = x[t, a], x[t, b]
        x[t, a] = x0 * c - x1 * s
        x[t, b] = x0 * s + x1 * c


@cuda.jit
def store_kv(k, v, kc, vc, pos0):
    """kc[pos0 + t] = k[t], vc[pos0 + t] = v[t]: the new keys and values into the device KV cache."""
    c, t = cuda.grid(2)
    if c < k.shape[1] and t < k.shape[0]:
        kc[pos0 + t, c] = k[t, c]
        vc[pos0 + t, c] = v[t, c]


@cuda.jit
def attention(q, kc, vc, pos0, n_head, n_head_kv, head_dim, out):
    """kernels.ops.attention on the device (causal GQA over cache rows [0, pos0 + t]): one thread per output
    value (d, token t, head h), with a one-pass (online) softmax; each thread recomputes its head's scores,
    which costs head_dim-fold compute but no shared memory or synchronisation."""
    d, th = cuda.grid(2)
    if d < head_dim and th < q.shape[0] * n_head:
        t, h = th // n_head, th % n_head
        qo, ko = h * head_dim, (h // (n_head // n_head_kv)) * head_dim
        scale = float32(1.0 / math.sqrt(head_dim))
        m = float32(-math.inf)
        total = float32(0.0)
        acc = float32(0.0)
        for j in range(pos0 + t + 1):
            s = float32(0.0)
            for e in range(head_dim):
                s += q[t, qo + e] * kc[j, ko + e]
            s *= scale
            if s > m:
                corr = float32(math.exp(m - s))
                total = total * corr + float32(1.0)
                acc = acc * corr + vc[j, ko + d]
                m = s
            else:
                w = float32(math.exp(s - m))
                total += w
                acc += w * vc[j, ko + d]
        out[t, qo + d] = acc / total
