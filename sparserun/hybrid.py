"""CPU/GPU hybrid execution (PowerInfer's split): the placement's hot FFN neurons, attention projections and
output head run on a CUDA GPU through numba.cuda; the cold neurons stay in RAM and run sparsely on the CPU.

Per layer and token batch x (T, dim):
    GPU  (async on a stream)  h_hot = act(G_hot x) * (U_hot x), dropped neurons zeroed   (T, n_hot)
                              y_gpu = h_hot @ D_hot                                       (T, dim)
    CPU  (meanwhile)          y_cpu = SparseFFN over the cold neurons only (sparse_ffn.py) (T, dim)
    y = y_cpu + y_gpu         (the stream is synchronized only here, so the two halves overlap)
Where the layer's attention block is on the GPU too, its hot half is queued behind it on the same stream (the residual
add and FFN norm on the device, GPUAttention.chain): the CPU waits for the attention's output, then runs its cold half
while the hot half, already queued, computes; one round trip to the device a layer, not two.
The same per-neuron keep rule runs on both sides (threshold, ReLU zeros, a predictor's set), so the hybrid
computes the CPU path's FFN exactly, up to float rounding: weights go to the device in device_rows' formats (F32
as float32: tight equality, tested; Q4_0 and Q8_0 rows as the file's bytes; the down columns as the CPU packs'),
and the GPU multiplies float activations where the CPU's kernels take int8 ones.
topk ranks all of a layer's neurons together and cannot be split; it is refused with --device cuda.
A placed layer's whole attention block runs on the GPU (GPUAttention: projections, RoPE, a device KV cache,
attention), and a placed output head is a GPU matvec (DeviceWeight). Nothing here is imported unless a GPU
path is asked for.
"""
import functools
import sys

import numpy as np

from .errors import SparserunError

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
        from . import gpu_kernels as G

        # a kernel compiled and run, not only a copy: a numba-cuda that cannot compile (e.g. against a numpy it
        # does not support) is found here, not at the first layer
        parts = cuda.to_device(np.arange(8, dtype=np.float32).reshape(2, 1, 4))
        y = cuda.device_array((1, 4), np.float32)
        G.sum_parts[(1, 1), (4, 1)](parts, y)
        if not np.array_equal(y.copy_to_host(), [[4, 6, 8, 10]]):
            return False, "the GPU returned wrong data"
    except Exception as e:
        msg = str(e).strip().splitlines()
        return False, f"CUDA failed: {type(e).__name__}: {msg[-1][:120] if msg else ''}"
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


def make_placement(model, vram_budget=None, placement=None, profile=None, gate_dense=None, policy=None):
    """A saved placement (checked against the model): `placement` (a `sparserun place` file or PowerInfer's GPU index),
    or without a budget the one `sparserun place` saved beside the model; else a plan for vram_budget GiB (None: the
    whole model) from the neurons' activation frequencies: the profile's (a path, or <model>.gguf.profile.gguf when it
    exists), else measured under the policy (None: the model's) at first use (placement.builtin_frequencies).
    gate_dense (None: the policy says) whether the CPU reads every gate row it owns."""
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
    budget = P.device_bytes(model) if vram_budget is None else int(vram_budget * GIB)
    policy = policy or model.policy
    if profile is not None:
        freq = Pr.load_profile(profile, model).frequency
    elif budget >= P.device_bytes(model):
        freq = None  # everything fits: the frequencies change nothing
    else:
        freq = P.builtin_frequencies(model, policy)
    if gate_dense is None:
        gate_dense = policy.gate_dense
    return P.plan(model, budget, freq, gate_dense=gate_dense)


class DeviceRows:
    """A matrix's rows uploaded in their device format (device_rows.HostRows): quants q and scales s."""

    def __init__(self, host):
        from numba import cuda

        self.fmt = host.fmt
        self.q, self.s = cuda.to_device(host.q), cuda.to_device(host.s)
        self.n_bytes = host.n_bytes


class DeviceWeight:
    """A weight matrix held on the GPU in its device format (device_rows), with Weight.matmul."""

    def __init__(self, w, gguf=None):
        from . import device_rows as R

        self.name, self.qtype, self.rows, self.cols = w.name + "[gpu]", w.qtype, w.rows, w.cols
        self.type_name = w.type_name
        self.dev = DeviceRows(R.rows(w, gguf=gguf))
        self.n_bytes = self.dev.n_bytes
        self._buf = None

    def launcher(self, d_x, d_out, stream=0):
        """A prepared launch of d_out (T, rows) = d_x (T, cols) @ W.T on device arrays (queued, not synchronised)."""
        from . import gpu_kernels as G

        blocks, threads = G.row_grid(self.rows, d_x.shape[0])
        return G.prepare(G.rows_matvec(self.dev.fmt), blocks, threads, stream, (self.dev.q, self.dev.s, d_x, d_out))

    def matmul(self, acts, out=None):
        from numba import cuda

        x = np.ascontiguousarray(acts.x, np.float32)
        T = x.shape[0]
        if self._buf is None or self._buf[0] != T:  # device buffers and launch reused across tokens (decode: T = 1)
            d_x, d_out = cuda.device_array((T, self.cols), np.float32), cuda.device_array((T, self.rows), np.float32)
            self._buf = (T, d_x, d_out, self.launcher(d_x, d_out))
        _, d_x, d_out, run = self._buf
        d_x.copy_to_device(x)
        run()
        res = d_out.copy_to_host()
        if out is None:
            return res
        out[:] = res
        return out


class DevicePosition:
    """The first position of the tokens in flight, in device memory (1,) int64, shared by the GPU attention blocks:
    their launches keep the same arguments from token to token, and it is uploaded once per forward, not per layer
    (on the stream, ahead of the launches that read it)."""

    def __init__(self, stream):
        from numba import cuda

        self.d = cuda.to_device(np.zeros(1, np.int64))
        self.host = cuda.pinned_array(1, np.int64)
        self.value, self.stream = 0, stream

    def set(self, pos0):
        if pos0 != self.value:
            self.host[0] = pos0  # the previous upload has run: the stream was synchronized since
            self.d.copy_to_device(self.host, stream=self.stream)
            self.value = pos0


class GPUAttention:
    """A layer's whole attention block on the GPU: q/k/v projections, RoPE, its KV cache (n_ctx, kv_dim) in device
    memory, causal GQA attention and the output projection. Called with the normalised input (T, dim), the first
    position and the residual stream (T, dim); returns the block's output (T, dim): one upload, nine prepared
    launches, one download, all on the model's device stream.

    chain: None, or HybridFFN's hook for a layer whose hot FFN neurons are on the GPU too. It queues, behind the
    attention's download, the residual add and FFN norm (add_rmsnorm) and the hot FFN on the device's own copy of
    the block's output, so that the hot half is computing while the CPU adds, normalises and starts its cold half:
    the layer costs the CPU one round trip to the device, not two (the FFN's upload and launches would otherwise
    wait for the attention's download)."""

    def __init__(self, model, L, pos, stream):
        from numba import cuda

        a = model.args
        self.a, self.pos, self.stream, self.chain = a, pos, stream, None
        self.done = cuda.event()  # passed when the block's output is on the host
        self.wq, self.wk, self.wv, self.wo = (DeviceWeight(w, model.gguf) for w in (L.wq, L.wk, L.wv, L.wo))
        self.kc = cuda.to_device(np.zeros((model.n_ctx, a.kv_dim), np.float32))  # (n_ctx, kv_dim)
        self.vc = cuda.to_device(np.zeros((model.n_ctx, a.kv_dim), np.float32))  # (n_ctx, kv_dim)
        self.inv_freq = cuda.to_device(np.ascontiguousarray(L.rope_inv_freq, np.float32))
        from . import arch

        self.neox = a.rope_type == arch.ROPE_NEOX
        self._buf = None

    def _buffers(self, T):
        """x (T, dim), q (T, n_head*head_dim), k, v (T, kv_dim), att (T, n_head*head_dim), out (T, dim) on the
        device and the block's launches over them, kept for the last T (decode reuses them every token)."""
        from numba import cuda

        from . import gpu_kernels as G

        if self._buf is None or self._buf[0].shape[0] != T:
            a, qdim, s = self.a, self.a.n_head * self.a.head_dim, self.stream
            x, q, k, v, att, out, resid = (cuda.device_array((T, n), np.float32)
                                           for n in (a.dim, qdim, a.kv_dim, a.kv_dim, qdim, self.wo.rows, a.dim))
            half, pos = a.rope_dim // 2, self.pos.d
            runs = [w.launcher(x, dst, s) for w, dst in ((self.wq, q), (self.wk, k), (self.wv, v))]
            runs += [G.prepare(G.rope, ((half + 31) // 32, T * heads), (32, 1), s,
                               (y, pos, heads, a.head_dim, a.rope_dim, self.inv_freq, self.neox))
                     for y, heads in ((q, a.n_head), (k, a.n_head_kv))]
            blocks, threads = G.grid(a.kv_dim, T)
            runs.append(G.prepare(G.store_kv, blocks, threads, s, (k, v, self.kc, self.vc, pos)))
            blocks, threads = G.attention_grid(T, a.n_head)
            runs.append(G.prepare(G.attention, blocks, threads, s,
                                  (q, self.kc, self.vc, pos, a.n_head, a.n_head_kv, a.head_dim, att)))
            runs.append(self.wo.launcher(att, out, s))
            host = cuda.pinned_array((3, T, a.dim), np.float32)  # staging: [0] the input, [1] the output, [2] residual
            self._buf = (x, out, resid, host, runs)
        return self._buf

    def __call__(self, xn, pos0, residual):
        x, out, resid, host, runs = self._buffers(xn.shape[0])
        s = self.stream
        self.pos.set(pos0)
        host[0] = xn
        x.copy_to_device(host[0], stream=s)
        if self.chain is not None:
            host[2] = residual
            resid.copy_to_device(host[2], stream=s)
        for run in runs:
            run()
        out.copy_to_host(host[1], stream=s)
        if self.chain is None:
            s.synchronize()
        else:
            self.done.record(s)
            self.chain(resid, out)  # the hot FFN, queued behind the download
            self.done.synchronize()
        return host[1].copy()  # the staging buffer is reused by the next layer's call


class HybridFFN:
    """The FFN hook of a hybrid model: GPU hot part and CPU cold part of every layer, summed."""

    def __init__(self, model, policy, predictor, placement):
        from numba import cuda

        from . import device_rows as R
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
        self.stream = model.device_stream or cuda.stream()  # the attention blocks' stream when they are placed
        self.layers = []  # per layer: None, or (hot ids, gate rows, up rows, down columns, hot position map, gated)
        self.chained = None  # (layer, T) whose hot half the layer's device attention block has queued (chain)
        for li, (L, ids) in enumerate(zip(model.layers, hot)):
            if len(ids) == 0:
                self.layers.append(None)
                continue
            gated = L.w_gate is not None
            up = DeviceRows(R.rows(L.w_up, ids, model.gguf))  # (n_hot, dim) in the up rows' device format
            gate = DeviceRows(R.rows(L.w_gate, ids, model.gguf) if gated else R.quantize(np.zeros((1, 32)), R.F32))
            down = DeviceRows(R.down_columns(L.w_down, ids))  # (n_hot, dim) neuron-major: the CPU packs' values
            pos = np.full(a.n_ff, -1, np.int64)
            pos[ids] = np.arange(len(ids))
            self.layers.append((ids, gate, up, down, pos, gated))
        self.no_mask = cuda.to_device(np.zeros((1, 1), np.uint8))
        self.bufs = {}
        # a layer with attention and hot neurons on the device chains them (GPUAttention.chain); a predictor's set
        # depends on the CPU's FFN input, so its hot half waits for the CPU as before
        self.norms = {}
        for li, L in enumerate(model.layers):
            if L.gpu_attn is not None:
                L.gpu_attn.chain = None
                if self.layers[li] is not None and self.predictor is None:
                    self.norms[li] = cuda.to_device(np.ascontiguousarray(L.ffn_norm, np.float32))
                    L.gpu_attn.chain = functools.partial(self.queue_chained, li)

    def _buffers(self, li, T):
        """Per layer, kept for the last T (decode reuses them every token: no allocation, no argument preparation on
        the token path): pinned host x and y (T, dim), device x (T, dim), the predictor's mask (T, n_hot) when there
        is one, h (T, n_hot), hot_ffn_out's partial sums (CHUNKS, T, dim), y (T, dim), and the three prepared launches
        (hot_ffn_in, hot_ffn_out, sum_parts) on the FFN stream."""
        from numba import cuda

        from . import gpu_kernels as G

        b = self.bufs.get(li)
        if b is None or b["x"].shape[0] != T:
            ids, gate, up, down, pos, gated = self.layers[li]
            n_hot, dim, s = len(ids), self.dim, self.stream
            b = {"x_host": cuda.pinned_array((T, dim), np.float32), "y_host": cuda.pinned_array((T, dim), np.float32),
                 "x": cuda.device_array((T, dim), np.float32), "y": cuda.device_array((T, dim), np.float32),
                 "mask": cuda.device_array((T, n_hot), np.uint8) if self.predictor is not None else self.no_mask}
            h = cuda.device_array((T, n_hot), np.float32)
            parts = cuda.device_array((G.CHUNKS, T, dim), np.float32)
            blocks, threads = G.row_grid(n_hot, T)
            b["runs"] = [
                G.prepare(G.hot_ffn_in(gate.fmt, up.fmt), blocks, threads, s,
                          (gate.q, gate.s, up.q, up.s, gated, b["x"], self.act, self.thr[li], b["mask"],
                           self.predictor is not None, h)),
                G.prepare(G.hot_ffn_out(down.fmt), *G.out_grid(dim, T), s, (down.q, down.s, h, parts)),
                G.prepare(G.sum_parts, *G.grid(dim, T), s, (parts, b["y"]))]
            self.bufs[li] = b
        return b

    # statistics of the CPU half, as SparseFFN reports them (bench's kept-fraction column)
    def reset_stats(self):
        self.cpu.reset_stats()

    def kept_fraction(self):
        return self.cpu.kept_fraction()

    def __call__(self, li, acts):
        x = np.ascontiguousarray(acts.x, np.float32)  # (T, dim)
        T = x.shape[0]
        if self.predictor is not None:
            self.predicted = self.predictor(li, acts)
        if self.layers[li] is None:
            return self.cpu(li, acts)
        if self.chained == (li, T):  # queued behind the layer's device attention block
            y_gpu = self.bufs[li]["y_host"]
        else:
            y_gpu = self.queue_hot(li, x)
        self.chained = None
        # the CPU's cold part runs while the stream works
        y = np.zeros((T, self.dim), np.float32) if self.cpu_empty[li] else self.cpu(li, acts)
        self.stream.synchronize()  # the layer's one synchronisation
        return y + y_gpu  # a new array: y_gpu is reused by the next call

    def queue_chained(self, li, d_resid, d_att):
        """GPUAttention.chain of layer li: queue its hot half on the device's copy of the FFN input, add_rmsnorm(residual
        d_resid + attention output d_att) (both (T, dim) on the device), then the kernels and the download."""
        from . import gpu_kernels as G

        T = d_resid.shape[0]
        b = self._buffers(li, T)
        if b.get("chain", (None, None))[0] is not d_resid:  # prepared once per batch size, as the other launches
            b["chain"] = (d_resid, G.prepare(G.add_rmsnorm, (T,), (G.THREADS,), self.stream,
                                             (d_resid, d_att, self.norms[li], float(self.model.args.norm_eps),
                                              b["x"])))
        b["chain"][1]()
        for run in b["runs"]:
            run()
        b["y"].copy_to_host(b["y_host"], stream=self.stream)
        self.chained = (li, T)

    def queue_hot(self, li, x):
        """Queue layer li's hot half for x (T, dim) on the stream: upload, kernels, download. Returns the pinned
        host y (T, dim), valid once the stream is synchronized."""
        ids, pos = self.layers[li][0], self.layers[li][4]
        s, T = self.stream, x.shape[0]
        b = self._buffers(li, T)
        if self.predicted is not None:  # the predictor's set, as a mask over the hot neurons
            mask = np.zeros((T, len(ids)), np.uint8)
            for t, p in enumerate(self.predicted):
                q = pos[np.asarray(p, np.int64)]
                mask[t, q[q >= 0]] = 1
            b["mask"].copy_to_device(mask, stream=s)
        b["x_host"][:] = x
        b["x"].copy_to_device(b["x_host"], stream=s)
        for run in b["runs"]:
            run()
        b["y"].copy_to_host(b["y_host"], stream=s)
        return b["y_host"]


def install(model, placement):
    """Move the placement's attention projections and output head (or the hot head's hot rows) to the GPU and hook the
    hybrid FFN."""
    from numba import cuda

    from . import gpu_kernels as G

    model.restore_rows()  # the device copies are made from them
    model.device_stream = cuda.stream()  # the attention blocks' and the hot FFNs' (chained on it)
    pos = DevicePosition(model.device_stream)
    attention = {li: GPUAttention(model, L, pos, model.device_stream) for li, L in enumerate(model.layers)
                 if placement.attn_gpu[li] and L.plain_attention and model.args.head_dim <= G.MAX_HEAD_DIM}
    # (the device kernel is llama's block only, heads of up to MAX_HEAD_DIM)
    output = None
    if placement.output_gpu and model.head is not None:  # the hot head's exact rows (placement.plan's head item)
        model.head.hot_w = DeviceWeight(model.head.hot_w, model.gguf)
    elif placement.output_gpu:
        output = DeviceWeight(model.output, model.gguf)
    model.place_on_device(placement, attention, output)
