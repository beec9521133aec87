"""numba.cuda kernels of the hybrid (imported only when a GPU path is used; NUMBA_ENABLE_CUDASIM=1 runs them on
the CPU for the tests).

Weights arrive in device_rows' formats (F32, F16, or Q4 / Q8 quants as uint32 words beside fp16 scales) and are
dequantized in registers. Shapes of work:
- a row times a vector (projections, head, hot gate/up rows): one warp per row. Lane l reads words l, l + 32, ...
  of the row, so the warp loads 128 contiguous bytes per step (coalesced), and the 32 partial sums meet in a
  shuffle reduction (no shared memory). Each warp takes TILE tokens at once, so a prompt batch reads a row once
  per TILE tokens.
- the down columns of the hot neurons (neuron-major, one row of `dim` per neuron): one thread per output value;
  a zero neuron is skipped by the whole warp (h is read as a broadcast). The neurons are split into CHUNKS
  ranges over the grid's second axis, each writing its own partial sums; sum_parts adds them in a fixed order:
  no atomics, the same result every run.
- attention: one warp per (token, head), scores computed once per (query, key) (a warp-wide dot), online
  softmax, each lane holding head_dim / 32 of the output.
- add_rmsnorm: one block per token (a shared-memory tree sum), the residual add and FFN norm between a device
  attention block and the hot FFN that follows it on the stream.
Everything accumulates in float32. Under numba's CUDA simulator (the tests) a warp is 2 lanes, not 32, blocks are
smaller and hot_ffn_out takes 2 chunks: the simulator runs every thread as a Python thread, and the same code, its
lane strides, shuffle steps and chunked sums all exercised, then runs far fewer of them (the 32-lane build is what
a GPU compiles and runs; the tests cannot). Kernels are built per weight format (numba types every branch, and the
quantized formats' bit operations do not type on float arrays): rows_matvec(fmt), hot_ffn_in(gate fmt, up fmt),
hot_ffn_out(fmt), cached on first use.
"""
import math
import sys
import threading

from numba import config, cuda, float32, float64, int32

from .device_rows import F16, F32, Q4, Q8

SIM = config.ENABLE_CUDASIM  # numba's CUDA simulator: smaller warps and blocks, see above
WARP = 2 if SIM else 32  # lanes per warp
WARPS = 4  # warps per block in the row kernels (128 threads)
TILE = 4  # tokens per warp in the row kernels
THREADS = 32 if SIM else 128  # threads per block of the per-output kernels
CHUNKS = 2 if SIM else 16  # neuron ranges of hot_ffn_out (partial sums; more blocks for a decode token's few outputs)
MAX_HEAD_DIM = 256
HEAD_LANES = MAX_HEAD_DIM // WARP  # query and output values per lane in attention (a constant: local arrays need one)
FULL = 0xFFFFFFFF

_sim_lock = threading.Lock()


def _simulated_shfl_xor_sync(self, mask, value, lane_mask):
    """cuda.shfl_xor_sync for numba's CUDA simulator, which has no warp shuffles: the lanes of the warp post
    their values, meet at the warp's barrier, read their partners' and meet again. Correct for the kernels here,
    whose warps shuffle or leave all together."""
    t = threading.current_thread()
    key = (t.blockIdx.x, t.blockIdx.y, t.blockIdx.z, t.thread_id // WARP)
    with _sim_lock:
        warps = t._manager.__dict__.setdefault("warps", {})
        if key not in warps:
            warps[key] = ({}, threading.Barrier(WARP))
    posted, barrier = warps[key]
    posted[t.thread_id] = value
    barrier.wait()
    got = posted[t.thread_id ^ lane_mask]
    barrier.wait()
    return got


if SIM:
    from numba.cuda.simulator.kernelapi import FakeCUDAModule

    sys.setswitchinterval(1e-4)  # a warp's lanes hand over at every shuffle: 5 ms each at Python's default
    if not hasattr(FakeCUDAModule, "shfl_xor_sync"):
        FakeCUDAModule.shfl_xor_sync = _simulated_shfl_xor_sync


@cuda.jit(device=True, inline=True)
def warp_sum(v):
    """The sum over the warp's lanes, in every lane."""
    off = WARP // 2
    while off > 0:
        v += cuda.shfl_xor_sync(FULL, v, off)
        off //= 2
    return v


def _lane_dot(fmt):
    """dot(q, s, r, x, t0, nt, lane, acc): acc[i] += this lane's share of row r . x[t0 + i], i < nt."""
    if fmt in (F32, F16):
        @cuda.jit(device=True, inline=True)
        def dot(q, s, r, x, t0, nt, lane, acc):
            for k in range(lane, x.shape[1], WARP):
                w = float32(q[r, k])
                for i in range(nt):
                    acc[i] += w * x[t0 + i, k]
    elif fmt == Q4:
        @cuda.jit(device=True, inline=True)
        def dot(q, s, r, x, t0, nt, lane, acc):
            # word wi: block wi // 4, bytes 4 (wi % 4) .. + 3: values 4 (wi % 4) + e (low) and + 16 (high nibble)
            for wi in range(lane, q.shape[1], WARP):
                b = wi // 4
                base = b * 32 + (wi % 4) * 4
                w = int32(q[r, wi])
                d = float32(s[r, b])
                for e in range(4):
                    byte = (w >> (8 * e)) & 0xFF
                    lo = float32((byte & 15) - 8) * d
                    hi = float32((byte >> 4) - 8) * d
                    for i in range(nt):
                        acc[i] += lo * x[t0 + i, base + e] + hi * x[t0 + i, base + 16 + e]
    else:
        @cuda.jit(device=True, inline=True)
        def dot(q, s, r, x, t0, nt, lane, acc):
            # word wi: block wi // 8, values 4 (wi % 8) .. + 3 as signed bytes
            for wi in range(lane, q.shape[1], WARP):
                b = wi // 8
                base = b * 32 + (wi % 8) * 4
                w = int32(q[r, wi])
                d = float32(s[r, b])
                for e in range(4):
                    byte = (w >> (8 * e)) & 0xFF
                    v = float32(byte - 256 if byte >= 128 else byte) * d
                    for i in range(nt):
                        acc[i] += v * x[t0 + i, base + e]
    return dot


def _element(fmt):
    """value(q, s, j, d): element d of row j (the down columns' per-output read)."""
    if fmt in (F32, F16):
        @cuda.jit(device=True, inline=True)
        def value(q, s, j, d):
            return float32(q[j, d])
    elif fmt == Q4:
        @cuda.jit(device=True, inline=True)
        def value(q, s, j, d):
            b, p = d // 32, d % 32
            byte = (int32(q[j, b * 4 + (p % 16) // 4]) >> (8 * (p % 4))) & 0xFF
            return float32(((byte >> 4) if p >= 16 else (byte & 15)) - 8) * float32(s[j, b])
    else:
        @cuda.jit(device=True, inline=True)
        def value(q, s, j, d):
            b, p = d // 32, d % 32
            byte = (int32(q[j, b * 8 + p // 4]) >> (8 * (p % 4))) & 0xFF
            return float32(byte - 256 if byte >= 128 else byte) * float32(s[j, b])
    return value


@cuda.jit(device=True)
def activate(a, act):
    """0 silu, 1 relu, 2 gelu (tanh form), 3 relu (relu_sym): the CPU's ops.ffn_activate."""
    if act == 0:
        return a / (float32(1.0) + float32(math.exp(-a)))
    if act == 1 or act == 3:
        return a if a > 0 else float32(0.0)
    return float32(0.5) * a * (float32(1.0) + float32(math.tanh(float32(0.7978845608) * (a + float32(0.044715) * a * a * a))))


_built = {}


def rows_matvec(fmt):
    """Kernel (q, s, x, out): out[t, r] = row r . x[t]; rows q/s (rows, ...) in fmt, x (T, cols), out (T, rows).
    Launch with row_grid(rows, T)."""
    key = ("matvec", fmt)
    if key not in _built:
        dot = _lane_dot(fmt)

        @cuda.jit
        def matvec(q, s, x, out):
            lane = cuda.threadIdx.x % WARP
            r = cuda.blockIdx.x * WARPS + cuda.threadIdx.x // WARP
            t0 = cuda.blockIdx.y * TILE
            if r >= out.shape[1]:  # the whole warp leaves together
                return
            nt = min(TILE, x.shape[0] - t0)
            acc = cuda.local.array(TILE, float32)
            for i in range(TILE):
                acc[i] = 0.0
            dot(q, s, r, x, t0, nt, lane, acc)
            for i in range(nt):
                v = warp_sum(acc[i])
                if lane == 0:
                    out[t0 + i, r] = v

        _built[key] = matvec
    return _built[key]


def row_grid(rows, T):
    """(blocks, threads) of a warp-per-row launch over rows and T tokens."""
    return ((rows + WARPS - 1) // WARPS, (T + TILE - 1) // TILE), (WARP * WARPS, 1)


def hot_ffn_in(gate_fmt, up_fmt):
    """Kernel (gq, gs, uq, us, gated, x, act, thr, mask, use_mask, h): h[t, j] for hot neuron j (row j of the hot
    gate and up rows): act(gate_j . x_t) * (up_j . x_t) (gated) or act(up_j . x_t), zero when the neuron is
    dropped: |act| <= thr (thr < 0 keeps all), or, with use_mask, mask[t, j] == 0 (a predictor said inactive:
    then neither row is read). x (T, dim); h (T, n_hot). Launch with row_grid(n_hot, T)."""
    key = ("ffn_in", gate_fmt, up_fmt)
    if key not in _built:
        gdot, udot = _lane_dot(gate_fmt), _lane_dot(up_fmt)

        @cuda.jit
        def ffn_in(gq, gs, uq, us, gated, x, act, thr, mask, use_mask, h):
            lane = cuda.threadIdx.x % WARP
            j = cuda.blockIdx.x * WARPS + cuda.threadIdx.x // WARP
            t0 = cuda.blockIdx.y * TILE
            if j >= h.shape[1]:
                return
            nt = min(TILE, x.shape[0] - t0)
            live = 0
            for i in range(nt):
                if not use_mask or mask[t0 + i, j] != 0:
                    live += 1
            if live == 0:  # predicted inactive for every token of the tile: no row read
                for i in range(lane, nt, WARP):
                    h[t0 + i, j] = 0.0
                return
            ua = cuda.local.array(TILE, float32)
            ga = cuda.local.array(TILE, float32)
            for i in range(TILE):
                ua[i] = 0.0
                ga[i] = 0.0
            udot(uq, us, j, x, t0, nt, lane, ua)
            if gated:
                gdot(gq, gs, j, x, t0, nt, lane, ga)
            for i in range(nt):
                u = warp_sum(ua[i])
                g = warp_sum(ga[i])
                if lane == 0:
                    a = activate(g if gated else u, act)
                    if (use_mask and mask[t0 + i, j] == 0) or abs(a) <= thr:
                        h[t0 + i, j] = 0.0
                    elif gated:
                        h[t0 + i, j] = a * (max(u, float32(0.0)) if act == 3 else u)
                    else:
                        h[t0 + i, j] = a

        _built[key] = ffn_in
    return _built[key]


def hot_ffn_out(fmt):
    """Kernel (dq, ds, h, parts): parts[c, t, d] = sum over the neurons j of chunk c of h[t, j] * down_j[d]; down
    rows dq/ds (n_hot, dim) in fmt (neuron-major), h (T, n_hot), parts (CHUNKS, T, dim). Zero neurons are
    skipped. Launch with out_grid(dim, T); then sum_parts."""
    key = ("ffn_out", fmt)
    if key not in _built:
        value = _element(fmt)

        @cuda.jit
        def ffn_out(dq, ds, h, parts):
            d = cuda.blockIdx.x * THREADS + cuda.threadIdx.x
            c, t = cuda.blockIdx.y, cuda.blockIdx.z
            if d >= parts.shape[2]:
                return
            n = h.shape[1]
            per = (n + CHUNKS - 1) // CHUNKS
            acc = float32(0.0)
            for j in range(c * per, min(n, (c + 1) * per)):
                hv = h[t, j]
                if hv != 0.0:
                    acc += hv * value(dq, ds, j, d)
            parts[c, t, d] = acc

        _built[key] = ffn_out
    return _built[key]


def out_grid(dim, T):
    return ((dim + THREADS - 1) // THREADS, CHUNKS, T), (THREADS, 1, 1)


@cuda.jit
def sum_parts(parts, y):
    """y[t, d] = sum over c of parts[c, t, d], c in order."""
    d, t = cuda.grid(2)
    if d < y.shape[1] and t < y.shape[0]:
        acc = float32(0.0)
        for c in range(parts.shape[0]):
            acc += parts[c, t, d]
        y[t, d] = acc


@cuda.jit
def add_rmsnorm(x, a, w, eps, xn):
    """xn[t] = kernels.ops.rmsnorm(x[t] + a[t]) * w, one block of THREADS per token t: the residual add and the FFN's
    input norm of a layer whose attention block ran on the device, so that its hot FFN follows on the same stream
    without a round trip through the CPU. The sum of squares in float64, as the CPU's. Launch with ((T,), (THREADS,))."""
    t, lane = cuda.blockIdx.x, cuda.threadIdx.x
    n = x.shape[1]
    part = cuda.shared.array(THREADS, float64)
    ss = float64(0.0)
    for i in range(lane, n, THREADS):
        r = x[t, i] + a[t, i]
        ss += float64(r) * float64(r)
    part[lane] = ss
    cuda.syncthreads()
    step = THREADS // 2
    while step > 0:  # tree sum over the block (THREADS is a power of two)
        if lane < step:
            part[lane] += part[lane + step]
        cuda.syncthreads()
        step //= 2
    s = float32(1.0 / math.sqrt(part[0] / n + eps))
    for i in range(lane, n, THREADS):
        xn[t, i] = (x[t, i] + a[t, i]) * s * w[i]


def grid(n, T):
    """(blocks, threads) for a thread-per-output (n outputs, T tokens) launch."""
    return ((n + THREADS - 1) // THREADS, T), (THREADS, 1)


@cuda.jit
def rope(x, pos, n_heads, head_dim, rope_dim, inv_freq, neox):
    """kernels.ops.rope on the device: rotate pair i of head h of token t (at position pos[0] + t) in place. The
    position is read from device memory so that a layer's launches keep the same arguments (prepare)."""
    pos0 = pos[0]
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
def store_kv(k, v, kc, vc, pos):
    """kc[pos[0] + t] = k[t], vc[pos[0] + t] = v[t]: the new keys and values into the device KV cache."""
    pos0 = pos[0]
    c, t = cuda.grid(2)
    if c < k.shape[1] and t < k.shape[0]:
        kc[pos0 + t, c] = k[t, c]
        vc[pos0 + t, c] = v[t, c]


@cuda.jit
def attention(q, kc, vc, pos, n_head, n_head_kv, head_dim, out):
    """kernels.ops.attention on the device (causal GQA over cache rows [0, pos[0] + t]): one warp per (token t,
    head h). Lane l holds elements l, l + 32, ... of the query and of the output; each key's score is one
    warp-wide dot (computed once), then the online softmax rescales the lanes' running sums. Launch with
    attention_grid(T, n_head)."""
    pos0 = pos[0]
    lane = cuda.threadIdx.x % WARP
    th = cuda.blockIdx.x * WARPS + cuda.threadIdx.x // WARP
    if th >= q.shape[0] * n_head:
        return
    t, h = th // n_head, th % n_head
    qo, ko = h * head_dim, (h // (n_head // n_head_kv)) * head_dim
    per = (head_dim + WARP - 1) // WARP
    qv = cuda.local.array(HEAD_LANES, float32)
    acc = cuda.local.array(HEAD_LANES, float32)
    for i in range(per):
        e = lane + i * WARP
        qv[i] = q[t, qo + e] if e < head_dim else float32(0.0)
        acc[i] = 0.0
    scale = float32(1.0 / math.sqrt(head_dim))
    m = float32(-math.inf)
    total = float32(0.0)
    for j in range(pos0 + t + 1):
        s = float32(0.0)
        for i in range(per):
            e = lane + i * WARP
            if e < head_dim:
                s += qv[i] * kc[j, ko + e]
        s = warp_sum(s) * scale
        mn = max(m, s)
        corr = float32(math.exp(m - mn))
        w = float32(math.exp(s - mn))
        total = total * corr + w
        for i in range(per):
            e = lane + i * WARP
            if e < head_dim:
                acc[i] = acc[i] * corr + w * vc[j, ko + e]
        m = mn
    for i in range(per):
        e = lane + i * WARP
        if e < head_dim:
            out[t, qo + e] = acc[i] / total


def attention_grid(T, n_head):
    return ((T * n_head + WARPS - 1) // WARPS,), (WARP * WARPS,)


def prepare(kernel, griddim, blockdim, stream, args):
    """A callable that launches kernel[griddim, blockdim, stream](*args) again and again with the same arguments
    (a layer's weights and buffers, which never move). numba prepares a launch's arguments in Python at every
    call, tens of microseconds for a kernel of ten arrays, which would cost more than the kernels themselves at
    decode: here they are prepared once and each call is one driver launch. Falls back to the plain launch where
    numba-cuda's launch internals differ (older versions, the simulator)."""
    def plain():  # configured at each call: the simulator's kernel objects keep only their last configuration
        kernel[griddim, blockdim, stream](*args)

    plain.plain = plain  # the returned launch's plain form, prepared or not (benchmarks/hybrid_overlap.py times both)

    try:
        cfg = kernel[griddim, blockdim, stream]  # nothing is launched here: a kernel may write its outputs in place
        import sys

        compiled = kernel.compile(tuple(kernel.typeof_pyval(a) for a in args))
        module = sys.modules[type(compiled).__module__]
        retr, kargs = [], []
        for t, v in zip(compiled.argument_types, args):
            compiled._prepare_args(t, v, cfg.stream, retr, kargs)
        if retr or compiled.debug or compiled.cooperative:
            return plain
        config = module.LaunchConfig(grid=cfg.griddim, block=cfg.blockdim, shmem_size=cfg.sharedmem)
        fn, launch, s = compiled._codelibrary.get_cufunc().kernel, module.launch, cfg.stream
    except Exception:
        return plain

    def fast():
        launch(s, config, fn, *kargs)

    fast.args = args  # kargs holds raw device pointers: the arrays must live as long as the launch
    fast.plain = plain
    return fast
