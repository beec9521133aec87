"""CPU/GPU hybrid execution (PowerInfer's split): the placement's hot FFN neurons, attention projections and
output head run on a CUDA GPU through numba.cuda; the cold neurons stay in RAM and run sparsely on the CPU.

Per layer and token batch x (T, dim):
    GPU  (async on a stream)  h_hot = act(G_hot x) * (U_hot x), dropped neurons zeroed   (T, n_hot)
                              y_gpu = h_hot @ D_hot                                       (T, dim)
    CPU  (meanwhile)          y_cpu = SparseFFN over the cold neurons only (sparse_ffn.py) (T, dim)
    y = y_cpu + y_gpu         (the stream is synchronized only here, so the two halves overlap)
The same per-neuron keep rule runs on both sides (threshold, ReLU zeros, a predictor's set), so the hybrid
computes the CPU path's FFN exactly, up to float rounding: F32 models are placed as float32 (tight equality,
tested), other types as float16 rows dequantized from the file (the CPU keeps its int8-activation kernels).
topk ranks all of a layer's neurons together and cannot be split; it is refused with --device cuda.
A placed layer's whole attention block runs on the GPU (GPUAttention: projections, RoPE, a device KV cache,
attention), and a placed output head is a GPU matvec (DeviceWeight). Nothing here is imported unless a GPU
path is asked for.
"""
import sys

import numpy as np

from .errors import SparserunError
from .placement import device_itemsize

GIB = 1 << 30


def cuda_status():
    """(usable, why not): a CUDA GPU numba can launch a kernel on (or the simulator, NUMBA_ENABLE_CUDASIM=1)."""
    try:
        from numba import cuda
    except Exception as e:  # pragma: no cover - numba without its cuda target
        return False, f"numba.cuda cannot be imported ({e})"
    try:
        if not cuda.is_available():
            return False, "no CUDA driver or GPU found"
        probe = cuda.to_device(np.arange(4, dtype=np.float32))
        if float(probe.copy_to_host()[3]) != 3.0:
            return False, "the GPU returned wrong data"
    except Exception as e:
        return False, f"CUDA failed: {str(e).splitlines()[0][:120]}"
    return True, ""


def resolve_device(device, vram_budget=None, err=sys.stderr):
    """'cpu' or 'cuda' for --device cpu|cuda|auto (None: auto when a VRAM budget is given, else cpu)."""
    if device is None:
        device = "auto" if vram_budget is not None else "cpu"
    if device not in ("cpu", "cuda", "auto"):
        raise SparserunError(f"--device must be cpu, cuda or auto, got {device!r}")
    if device == "cpu":
        if vram_budget is not None:
            raise SparserunError("--vram-budget needs --device cuda or auto")
        return "cpu"
    if vram_budget is not None and vram_budget < 0:
        raise SparserunError(f"--vram-budget must be >= 0 GiB, got {vram_budget}")
    ok, why = cuda_status()
    if ok:
        return "cuda"
    if device == "cuda":
        raise SparserunError(f"--device cuda: {why}")
    print(f"sparserun: no usable CUDA GPU ({why}); running on the CPU", file=err)
    return "cpu"


def make_placement(model, vram_budget=None, placement=None, profile=None, gate_dense=True):
    """A saved placement (checked against the model): `placement` (a `sparserun place` file or PowerInfer's GPU index),
    or without a budget the one `sparserun place`
    saved beside the model; else a plan for vram_budget GiB (None: the whole model) from the profile (a path, or
    <model>.gguf.profile.gguf when it exists; without one every neuron counts as equally hot)."""
    from . import placement as P
    from . import profile as Pr
    from .side_files import PLACEMENT, PROFILE

    if vram_budget is None:  # a budget plans anew; without one, a saved placement is used
        placement = PLACEMENT.given_or_default(placement, model.path)
    if placement is not None:
        from . import powerinfer

        if powerinfer.is_gpu_index(placement):  # PowerInfer's *.gpuidx: its FFN neurons on the GPU
            return powerinfer.read_gpu_index(placement, model)
        return P.load_placement(placement, model)
    profile = PROFILE.given_or_default(profile, model.path)
    prof = Pr.load_profile(profile, model) if profile is not None else None
    budget = P.device_bytes(model) if vram_budget is None else int(vram_budget * GIB)
    return P.plan(model, budget, prof, gate_dense=gate_dense)


class DeviceWeight:
    """A weight matrix held on the GPU, transposed (cols, rows) for coalesced reads, with Weight.matmul."""

    def __init__(self, w):
        from numba import cuda

        self.name, self.qtype, self.rows, self.cols = w.name + "[gpu]", w.qtype, w.rows, w.cols
        self.n_bytes, self.type_name = w.n_bytes, w.type_name
        dt = np.float32 if device_itemsize(w) == 4 else np.float16
        self.wt = cuda.to_device(np.ascontiguousarray(w.dequantize().T.astype(dt)))
        self._buf = None

    def on_device(self, d_x, d_out):
        """d_out (T, rows) = d_x (T, cols) @ W.T, device arrays in and out (queued, not synchronised)."""
        from . import gpu_kernels as G

        blocks, threads = G.grid(self.rows, d_x.shape[0])
        G.matvec_t[blocks, threads](self.wt, d_x, d_out)

    def matmul(self, acts, out=None):
        from numba import cuda

        x = np.ascontiguousarray(acts.x, np.float32)
        T = x.shape[0]
        if self._buf is None or self._buf[0] != T:  # device buffers reused across tokens (decode: T = 1)
            self._buf = (T, cuda.device_array((T, self.cols), np.float32), cuda.device_array((T, self.rows), np.float32))
        _, d_x, d_out = self._buf
        d_x.copy_to_device(x)
        self.on_device(d_x, d_out)
        res = d_out.copy_to_host()
        if out is None:
            return res
        out[:] = res
        return out


class GPUAttention:
    """A layer's whole attention block on the GPU: q/k/v projections, RoPE, its KV cache (n_ctx, kv_dim) in device
    memory, causal GQA attention and the output projection. Called with the normalised input (T, dim) and the
    first position; returns the block's output (T, dim): one upload and one download per layer."""

    def __init__(self, model, L):
        from numba import cuda

        a = model.args
        self.a = a
        self.wq, self.wk, self.wv, self.wo = (DeviceWeight(w) for w in (L.wq, L.wk, L.wv, L.wo))
        self.kc = cuda.to_device(np.zeros((model.n_ctx, a.kv_dim), np.float32))  # (n_ctx, kv_dim)
        self.vc = cuda.to_device(np.zeros((model.n_ctx, a.kv_dim), np.float32))  # (n_ctx, kv_dim)
        self.inv_freq = cuda.to_device(np.ascontiguousarray(L.rope_inv_freq, np.float32))
        from . import arch

        self.neox = a.rope_type == arch.ROPE_NEOX
        self._buf = None

    def _buffers(self, T):
        """x (T, dim), q (T, n_head*head_dim), k, v (T, kv_dim), att (T, n_head*head_dim), out (T, dim) on the
        device, kept for the last T (decode reuses them every token)."""
        from numba import cuda

        if self._buf is None or self._buf[0].shape[0] != T:
            a, qdim = self.a, self.a.n_head * self.a.head_dim
            self._buf = tuple(cuda.device_array((T, n), np.float32)
                              for n in (a.dim, qdim, a.kv_dim, a.kv_dim, qdim, self.wo.rows))
        return self._buf

    def __call__(self, xn, pos0):
        from . import gpu_kernels as G

        a, T = self.a, xn.shape[0]
        d_x, q, k, v, att, out = self._buffers(T)
        d_x.copy_to_device(np.ascontiguousarray(xn, np.float32))
        for w, dst in ((self.wq, q), (self.wk, k), (self.wv, v)):
            w.on_device(d_x, dst)
        half = a.rope_dim // 2
        for x, heads in ((q, a.n_head), (k, a.n_head_kv)):
            G.rope[((half + 31) // 32, T * heads), (32, 1)](x, pos0, heads, a.head_dim, a.rope_dim, self.inv_freq,
                                                            self.neox)
        blocks, threads = G.grid(a.kv_dim, T)
        G.store_kv[blocks, threads](k, v, self.kc, self.vc, pos0)
        G.attention[((a.head_dim + 31) // 32, T * a.n_head), (32, 1)](q, self.kc, self.vc, pos0, a.n_head,
                                                                      a.n_head_kv, a.head_dim, att)
        self.wo.on_device(att, out)
        return out.copy_to_host()


class HybridFFN:
    """The FFN hook of a hybrid model: GPU hot part and CPU cold part of every layer, summed."""

    def __init__(self, model, policy, predictor, placement):
        from numba import cuda

        from .sparse_ffn import SparseFFN

        a = model.args
        thr = np.array([policy.device_threshold(p) for p in policy.layer_params(a.n_layer, a.n_ff)], np.float32)
        self.model, self.placement, self.dim, self.act = model, placement, a.dim, model.act_id
        hot = [np.asarray(g, np.int64) for g in placement.gpu_neurons]
        cold = [np.setdiff1d(np.arange(a.n_ff), g) for g in hot]
        self.predicted = None
        self.cpu = SparseFFN(model, policy, predictor, cpu_neurons=cold)
        self.policy, self.predictor = policy, self.cpu.predictor
        if self.predictor is not None:  # run it once per layer here; both halves use its answer
            self.cpu.predictor = lambda li, x: self.predicted
        self.cpu_empty = [len(c) == 0 for c in cold]
        self.thr = thr  # (n_layer,) the GPU share's keep rule; -1 keeps every (predicted) neuron
        self.stream = cuda.stream()
        self.layers = []  # per layer: None, or (hot ids, gate^T, up^T, down neuron-major, hot position map)
        for li, (L, ids) in enumerate(zip(model.layers, hot)):
            if len(ids) == 0:
                self.layers.append(None)
                continue
            dt = np.float32 if device_itemsize(L.w_up) == 4 else np.float16
            up_t = cuda.to_device(np.ascontiguousarray(L.w_up.rows_f32(ids).T.astype(dt)))  # (dim, n_hot)
            gate_t = (cuda.to_device(np.ascontiguousarray(L.w_gate.rows_f32(ids).T.astype(dt)))
                      if L.w_gate is not None else cuda.to_device(np.zeros((1, 1), dt)))  # (dim, n_hot)
            down = cuda.to_device(np.ascontiguousarray(L.w_down.dequantize()[:, ids].T.astype(dt)))  # (n_hot, dim)
            pos = np.full(a.n_ff, -1, np.int64)
            pos[ids] = np.arange(len(ids))
            self.layers.append((ids, gate_t, up_t, down, pos, L.w_gate is not None))
        self.no_mask = cuda.to_device(np.zeros((1, 1), np.uint8))
        self.bufs = {}

    def _buffers(self, li, T, n_hot):
        """Device buffers x (T, dim), h (T, n_hot), y (T, dim) and pinned host y, kept per layer for the last T
        (decode reuses them every token: no allocation on the token path)."""
        from numba import cuda

        b = self.bufs.get(li)
        if b is None or b[1].shape[0] != T:
            b = (cuda.device_array((T, self.dim), np.float32), cuda.device_array((T, n_hot), np.float32),
                 cuda.device_array((T, self.dim), np.float32), cuda.pinned_array((T, self.dim), np.float32))
            self.bufs[li] = b
        return b

    # statistics of the CPU half, as SparseFFN reports them (bench's kept-fraction column)
    def reset_stats(self):
        self.cpu.reset_stats()

    def kept_fraction(self):
        return self.cpu.kept_fraction()

    def __call__(self, li, acts):
        from numba import cuda

        from . import gpu_kernels as G

        x = np.ascontiguousarray(acts.x, np.float32)  # (T, dim)
        T = x.shape[0]
        if self.predictor is not None:
            self.predicted = self.predictor(li, acts)
        part = self.layers[li]
        if part is None:
            return self.cpu(li, acts)
        ids, gate_t, up_t, down, pos, gated = part
        s = self.stream
        n_hot = len(ids)
        if self.predicted is not None:
            mask = np.zeros((T, n_hot), np.uint8)
            for t, p in enumerate(self.predicted):
                q = pos[np.asarray(p, np.int64)]
                mask[t, q[q >= 0]] = 1
            d_mask, use_mask = cuda.to_device(mask, stream=s), True
        else:
            d_mask, use_mask = self.no_mask, False
        d_x, d_h, d_y, y_gpu = self._buffers(li, T, n_hot)
        d_x.copy_to_device(x, stream=s)
        blocks, threads = G.grid(n_hot, T)
        G.hot_ffn_in[blocks, threads, s](gate_t, up_t, d_x, gated, self.act, self.thr[li], d_mask, use_mask, d_h)
        blocks, threads = G.grid(self.dim, T)
        G.hot_ffn_out[blocks, threads, s](down, d_h, d_y)
        d_y.copy_to_host(y_gpu, stream=s)
        # the CPU's cold part runs while the stream works
        y = np.zeros((T, self.dim), np.float32) if self.cpu_empty[li] else self.cpu(li, acts)
        s.synchronize()
        return y + y_gpu  # a new array: y_gpu is reused by the next call


def install(model, placement):
    """Move the placement's attention projections and output head to the GPU and hook the hybrid FFN."""
    attention = {li: GPUAttention(model, L) for li, L in enumerate(model.layers)
                 if placement.attn_gpu[li] and L.plain_attention}  # the device kernel is llama's block only
    model.place_on_device(placement, attention, DeviceWeight(model.output) if placement.output_gpu else None)
