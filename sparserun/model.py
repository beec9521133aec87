"""The dense transformer engine: weights read in place from a GGUF, a preallocated KV cache, and a
batched forward pass (a prompt's tokens go through each weight matrix together).

One token's path: embedding row -> per layer [RMSNorm -> q,k,v matmuls -> RoPE -> KV cache ->
attention -> output matmul -> residual -> RMSNorm -> FFN (self.ffn, the hook the sparse policies
replace) -> residual] -> final RMSNorm -> output head -> logits.
"""
import math
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass

import numba
import numpy as np

from . import arch, teal
from .errors import ModelFileError, SparserunError
from .gguf_file import GGUFFile
from .kv_cache import KVCache
from .kernels import ops
from .memory import Arena, keep_freed_buffers
from .weights import Acts, Matmuls, TransposedWeight, Weight, in_memory_together, stackable

ACT_IDS = {"silu": 0, "relu": 1, "gelu": 2, "relu_sym": ops.RELU_SYM}  # relu_sym: relu(gate) * relu(up) (bamboo)


@dataclass
class Layer:
    attn_norm: np.ndarray  # (dim,)
    wq: Weight  # (n_head*head_dim, dim)
    wk: Weight  # (kv_dim, dim)
    wv: Weight  # (kv_dim, dim)
    wo: Weight  # (dim, n_head*head_dim)
    ffn_norm: np.ndarray  # (dim,)
    w_gate: Weight | None  # (n_ff, dim), None for a non-gated FFN
    w_up: Weight  # (n_ff, dim)
    w_down: Weight  # (dim, n_ff); a weights.TransposedWeight where the file holds ffn_down_t (PowerInfer)
    rope_inv_freq: np.ndarray = None  # (rope_dim/2,) this layer's RoPE frequencies
    rope_scale: float = 1.0  # cos and sin multiplied by this (LongRoPE's attention factor)
    window: int = 0  # sliding window (0: full causal attention)
    q_norm: np.ndarray = None  # (head_dim,) per-head RMSNorm gains of q and k (QK-norm), or None
    k_norm: np.ndarray = None
    attn_post_norm: np.ndarray = None  # (dim,) RMSNorm of attention's output before the residual add, or None
    ffn_post_norm: np.ndarray = None  # (dim,) the same for the FFN's output
    bq: np.ndarray = None  # (n_head*head_dim,), (kv_dim,), (kv_dim,) q/k/v biases, or None
    bk: np.ndarray = None
    bv: np.ndarray = None
    gpu_attn: object = None  # hybrid.GPUAttention when the placement put this layer's attention on the GPU

    def __post_init__(self):
        self.qkv = Matmuls([self.wq, self.wk, self.wv])  # one kernel call when the three share a type
        self.o = Matmuls([self.wo])
        self.up_gate = Matmuls([self.w_up] + ([self.w_gate] if self.w_gate is not None else []))

    @property
    def plain_attention(self):
        """llama's attention block exactly (what the GPU attention implements)."""
        return (self.window == 0 and self.rope_scale == 1.0 and self.q_norm is None and self.attn_post_norm is None
                and self.bq is None and self.bk is None and self.bv is None)


def default_threads():
    import psutil

    return max(1, min(numba.config.NUMBA_NUM_THREADS, psutil.cpu_count(logical=False) or 1))


class Model:
    """A loaded model with one KV cache. Use sparserun.load() to make one."""

    def __init__(self, path, threads=None, n_ctx=2048, n_batch=256, sparsity=None, predictor=None, kv_type="f16",
                 check_tensors=False):
        self.path = str(path)
        self.gguf = f = GGUFFile(path)
        if check_tensors:
            check_tensor_data(f)
        self.args = a = arch.model_args(f)
        if n_ctx < 1:
            raise SparserunError(f"n_ctx must be at least 1, got {n_ctx}")
        if kv_type not in ops.KV_TYPES:
            raise SparserunError(f"KV cache type must be one of {', '.join(ops.KV_TYPES)}, got {kv_type!r}")
        self.n_ctx, self.n_batch = int(n_ctx), int(n_batch)
        self.threads = int(threads) if threads else default_threads()
        if not 1 <= self.threads <= numba.config.NUMBA_NUM_THREADS:
            raise SparserunError(f"threads must be between 1 and {numba.config.NUMBA_NUM_THREADS}, got {threads}")

        def w(name, shape):
            return Weight(f.tensor(name, shape))

        keep_freed_buffers()  # a prompt batch's temporaries reused, not faulted in again each layer
        arena = Arena(in_memory_bytes(f))  # the matrices' memory, all in huge pages

        def mats(*names_shapes):
            """Matrices one matmul call reads together (q, k, v; up, gate), copied out of the file mapping into huge
            pages (weights.Weight.in_memory: Q4_0 repacked for the VNNI kernels where they run), back to back in one
            buffer when they stack (weights.joined: one stream for the kernel). 1-row vectors stay in place."""
            ms = [w(name, shape) for name, shape in names_shapes]
            if any(m.rows == 1 for m in ms):
                return ms
            rs = (in_memory_together(ms, arena.take) if all(stackable(ms[0], m) for m in ms)
                  else [m.in_memory(arena.take(m.raw.nbytes)) for m in ms])
            for m in ms:
                f.release_pages(m.raw)  # the file's copy is no longer read
            return rs

        def mat(name, shape):
            return mats((name, shape))[0]

        self.tok_embd = w("token_embd.weight", (a.n_vocab, a.dim))
        self.output_norm = w("output_norm.weight", (1, a.dim)).vector()
        self.output = self.tok_embd if a.tied_output else mat("output.weight", (a.n_vocab, a.dim))
        self.layers = []
        for i in range(a.n_layer):
            names = a.layer_tensors(i)  # key -> (tensor name, shape, required)
            present = {k: (n, shape) for k, (n, shape, required) in names.items() if required or f.has(n)}
            t = {}
            for keys in (["attn_q", "attn_k", "attn_v"], ["ffn_up", "ffn_gate"]):  # each read by one kernel call
                keys = [k for k in keys if k in present]
                t.update(zip(keys, mats(*(present[k] for k in keys))))
            t.update((k, mat(*ns)) for k, ns in present.items() if k not in t)
            for whole, parts in a.fused.items():  # row blocks of one matrix, back to back: still one stream
                t.update(zip(parts, split_rows(t.pop(whole), [a.layer_shapes()[0][k][0] for k in parts])))
            if a.down_t:  # neuron-major rows; the packs read the file's own bytes (source)
                t["ffn_down"] = TransposedWeight(t.pop("ffn_down_t"), f.tensor(present["ffn_down_t"][0]))
            vec = lambda k: t[k].vector() if k in t else None  # noqa: E731
            self.layers.append(Layer(
                vec("attn_norm"), t["attn_q"], t["attn_k"], t["attn_v"], t["attn_output"], vec("ffn_norm"),
                t.get("ffn_gate"), t["ffn_up"], t["ffn_down"], rope_inv_freq=a.rope_inv_freq(f, i, self.n_ctx),
                rope_scale=a.rope_attn_factor, window=a.window(i),
                q_norm=vec("attn_q_norm"), k_norm=vec("attn_k_norm"), attn_post_norm=vec("post_attention_norm"),
                ffn_post_norm=vec("post_ffw_norm"), bq=vec("attn_q.bias"), bk=vec("attn_k.bias"), bv=vec("attn_v.bias")))
        self.rope_inv_freq = a.rope_inv_freq(f, None, self.n_ctx)
        self.act_id = ACT_IDS[a.activation]
        # KV cache, preallocated (kv_cache.KVCache: per layer ops.kv_shapes, a ring for sliding-window layers); f16
        # (IEEE half bits, llama.cpp's default: half the memory) or f32
        self.kv_type = kv_type
        self.attn_scale = a.attn_scale or 1.0 / math.sqrt(a.head_dim)
        self.kv = KVCache(a, self.n_ctx, self.n_batch, kv_type)
        self.last_processed = 0  # tokens the last eval() computed
        self._tokenizer = None
        self.placement = None  # a hybrid.Placement once parts of the model run on a GPU (hybrid.install)
        self.device_stream = None  # and the CUDA stream its device work is queued on
        self._ffn_observer = None  # observing_ffn's callback
        self.head = None  # None: the dense head (self.output); else a head.HotHead (set_head)
        self.trace = None  # a trace.Trace while `--trace` records what ran for each token (start_trace)
        self.sparse = None  # the FFN object of the policy (set_sparsity); None: dense
        if sparsity is None:  # a PowerInfer file runs its own predictors unless told otherwise, as PowerInfer does
            from .powerinfer import has_predictors

            sparsity = "predictor" if has_predictors(f) and predictor is None else "dense"
        self.set_sparsity(sparsity, predictor)

    def set_sparsity(self, sparsity="dense", predictor=None):
        """Choose the sparsity policy (a spec string or sparsity.Policy; see sparsity.py)."""
        from .sparsity import parse_sparsity

        policy = parse_sparsity(sparsity)
        self.sparse = None  # the previous policy's packs go before the new one's load
        self.policy, self.predictor_arg = parse_sparsity("dense"), None  # until the new one is made
        self.restore_rows()  # the new policy releases what it runs from other copies (teal: load_packs)
        self.sparse = self.make_ffn(policy, predictor)
        self.policy, self.predictor_arg = policy, predictor
        self.kv.tokens.clear()  # cached keys/values were computed under the previous policy

    def restore_rows(self):
        """Read back every layer matrix a policy released (weights.Weight.release: teal's column inputs)."""
        for L in self.layers:
            for w in (L.wq, L.wk, L.wv, L.wo, L.w_gate, L.w_up, L.w_down):
                if isinstance(w, Weight):
                    w.restore()

    def make_ffn(self, policy, predictor=None):
        """The FFN object that runs a policy (None: the dense FFN): a SparseFFN, the hybrid's HybridFFN, or for
        `teal` alone a teal.TealFFN. A policy with input sparsity (teal) hands it to the FFN object as `inputs`, which
        the attention block reads too (teal.py): all four inputs of a layer under teal alone, attention's two when an
        FFN policy is combined with it (teal:S+POLICY)."""
        ffn_dense = policy.is_dense and predictor is None
        inputs = None
        if policy.teal is not None:
            from .teal import ATTENTION, InputSparsity, thresholds_for

            t, dropped = thresholds_for(self, policy.teal)
            inputs = InputSparsity(self, t, range(4) if ffn_dense else ATTENTION, dropped=dropped)
            inputs.load_packs(release=self.placement is None)  # the hybrid's placement reads the rows
        if self.placement is not None:
            from .hybrid import HybridFFN

            ffn = HybridFFN(self, policy, predictor, self.placement)
        elif ffn_dense:
            if inputs is None:
                return None
            from .teal import TealFFN

            return TealFFN(self, policy, inputs)
        else:
            from .sparse_ffn import SparseFFN

            ffn = SparseFFN(self, policy, predictor)
        ffn.inputs = inputs
        return ffn

    @property
    def inputs(self):
        """The input sparsity (teal.InputSparsity) the model runs under now, or None."""
        return getattr(self.sparse, "inputs", None)

    def set_head(self, spec="dense", profile=None):
        """The output head: "dense" or "hot[:K]" (head.py; the hot set and estimate from the model's profile when it
        has one). Returns the head object (None for dense)."""
        from .head import make_head

        self.head = make_head(self, spec, profile)
        return self.head

    def use_head(self, head):
        """Run with this head object (None: dense) from now on; returns the previous one (bench's modes)."""
        old, self.head = self.head, head
        return old

    @property
    def cached(self):
        """Token ids whose keys and values the current KV cache holds, in order."""
        return self.kv.tokens

    def use_cache(self, kv):
        """Run on the KV cache kv (a KVCache of this model's, e.g. self.kv.fresh()) from now on; returns the previous
        one. A caller keeps several contexts over one model this way (bench's modes)."""
        old, self.kv = self.kv, kv
        return old

    # ---- tokenizer ----
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from .tokenizer import Tokenizer

            self._tokenizer = Tokenizer(self.path)
        return self._tokenizer

    def tokenize(self, text, add_bos=True, special=True):
        return self.tokenizer.encode(text, add_bos=add_bos, special=special)

    def detokenize(self, ids):
        return self.tokenizer.decode(ids)

    @property
    def n_vocab(self):
        return self.args.n_vocab

    @property
    def bos_id(self):
        """The BOS token id from the file's metadata (-1: none), read without loading the tokenizer."""
        return int(self.gguf.get("tokenizer.ggml.bos_token_id", -1))

    def use_ffn(self, ffn):
        """Run the FFNs through ffn (a SparseFFN or HybridFFN of this model; None: dense) from now on; returns the
        previous one. bench keeps one per mode this way."""
        old, self.sparse = self.sparse, ffn
        return old

    @contextmanager
    def context_of(self, n_ctx):
        """Within the block, a fresh context of at least n_ctx positions (a KV cache of its own when the model's is
        smaller: a calibration pass over windows longer than the model was loaded for); the model's context after."""
        if n_ctx <= self.n_ctx:
            yield self
            return
        saved = self.n_ctx, self.use_cache(KVCache(self.args, n_ctx, self.n_batch, self.kv_type))
        self.n_ctx = n_ctx
        try:
            yield self
        finally:
            self.n_ctx = saved[0]
            self.use_cache(saved[1])

    @contextmanager
    def observing_ffn(self, observer):
        """Within the block, the FFNs run dense and call observer(layer, acts) first (profiling, calibration and
        predictor training watch the activations this way: activations.watch_ffn)."""
        saved = self.sparse, self._ffn_observer
        self.sparse, self._ffn_observer = None, observer
        try:
            yield self
        finally:
            self.sparse, self._ffn_observer = saved
            self.reset()

    def place_on_device(self, placement, attention, output):
        """hybrid.install's placement: attention blocks {layer: GPUAttention} and the output head (a DeviceWeight,
        or None to keep the CPU's) move to the GPU; the FFNs follow through set_sparsity (HybridFFN)."""
        for li, att in attention.items():
            self.layers[li].gpu_attn = att
        if output is not None:
            self.output = output
        self.placement = placement
        self.set_sparsity(self.policy, self.predictor_arg)

    def start_trace(self, path, ids=False, sparsity=None, head=None):
        """Record which parts of the model run for each token from now on, as JSON lines to path (trace.py; ids: the
        kept neuron ids too; sparsity, head: what the header names, by default the model's own). Returns the Trace;
        stop_trace() closes it."""
        from .trace import Trace

        self.stop_trace()
        self.trace = Trace(path, self, ids, sparsity, head)
        return self.trace

    def stop_trace(self):
        if self.trace is not None:
            self.trace.close()
            self.trace = None

    # ---- forward ----
    def ffn(self, layer_index, acts):
        """FFN of one layer: (T, dim) -> (T, dim), dense or through the sparsity policy."""
        if self._ffn_observer is not None:
            self._ffn_observer(layer_index, acts)
        if self.sparse is not None:
            return self.sparse(layer_index, acts)
        L = self.layers[layer_index]
        u, *g = L.up_gate(acts)  # (T, n_ff) each
        g = g[0] if g else u[:0]
        h = np.empty_like(u)  # (T, n_ff)
        ops.ffn_activate(g, u, self.act_id, h)
        return L.w_down.matmul(Acts(h))  # (T, dim)

    def _attention(self, L, li, xn, pos0, x):
        """Attention of layer li for normalized inputs xn (T, dim) of the residual stream x (T, dim) at positions
        pos0..: returns (T, dim) and writes the tokens' keys and values into the KV cache."""
        a = self.args
        T = xn.shape[0]
        if L.gpu_attn is not None:  # the whole attention block, KV cache included, on the GPU (x: for its chain)
            return L.gpu_attn(xn, pos0, x)
        inputs = self.inputs  # teal.InputSparsity or None
        # (T, n_head*head_dim), (T, kv_dim), (T, kv_dim)
        q, k, v = inputs(li, teal.QKV, L.qkv, xn) if inputs is not None else L.qkv(Acts(xn))
        for y, b in ((q, L.bq), (k, L.bk), (v, L.bv)):
            if b is not None:
                y += b
        if L.q_norm is not None:  # per-head RMSNorm (QK-norm), in place over (T*heads, head_dim) views
            ops.rmsnorm(q.reshape(-1, a.head_dim), L.q_norm, a.norm_eps, q.reshape(-1, a.head_dim))
            ops.rmsnorm(k.reshape(-1, a.head_dim), L.k_norm, a.norm_eps, k.reshape(-1, a.head_dim))
        neox = a.rope_type == arch.ROPE_NEOX
        ops.rope(q, pos0, a.n_head, a.head_dim, a.rope_dim, L.rope_inv_freq, neox, L.rope_scale)
        ops.rope(k, pos0, a.n_head_kv, a.head_dim, a.rope_dim, L.rope_inv_freq, neox, L.rope_scale)
        ops.store_kv(k, v, self.kv.k[li], self.kv.v[li], pos0)
        att = np.empty((T, a.n_head * a.head_dim), np.float32)  # (T, n_head*head_dim)
        ops.attention(q, self.kv.k[li], self.kv.v[li], pos0, a.n_head, self.threads, att, self.attn_scale,
                      L.window, a.attn_softcap)
        return inputs(li, teal.O, L.o, att)[0] if inputs is not None else L.wo.matmul(Acts(att))  # (T, dim)

    def _forward(self, ids, pos0, all_logits):
        """Run tokens ids at positions pos0.. through the model, filling the KV cache; returns logits
        (T, n_vocab) or (1, n_vocab) for the last token only."""
        a = self.args
        x = self.tok_embd.rows_f32(ids)  # (T, dim) residual stream
        if a.emb_scale != 1.0:
            x *= np.float32(a.emb_scale)
        xn = np.empty_like(x)  # (T, dim) normalized input of each sub-block
        if self.trace is not None:
            self.trace.begin(ids, pos0)
        if self.inputs is not None:
            self.inputs.pos0 = pos0  # position 0 (BOS) runs dense
        for li, L in enumerate(self.layers):
            ops.rmsnorm(x, L.attn_norm, a.norm_eps, xn)
            h = self._attention(L, li, xn, pos0, x)  # (T, dim)
            if L.attn_post_norm is not None:
                ops.rmsnorm(h, L.attn_post_norm, a.norm_eps, h)
            ops.add_inplace(x, h)
            ops.rmsnorm(x, L.ffn_norm, a.norm_eps, xn)
            h = self.ffn(li, Acts(xn, residual=x))  # (T, dim)
            if self.trace is not None and self.sparse is None:
                self.trace.dense(li, len(ids))
            if L.ffn_post_norm is not None:
                ops.rmsnorm(h, L.ffn_post_norm, a.norm_eps, h)
            ops.add_inplace(x, h)
            if not ops.all_finite(x):  # bad weights (NaN, Inf, garbage): say where, do not go on
                raise SparserunError(f"{self.path}: the forward pass turned non-finite (NaN or Inf) in layer {li}: the "
                                     "file's weights may hold NaN, Inf or garbage (--check-tensors checks them at load)")
        rows = x if all_logits else x[-1:]  # (T or 1, dim)
        out = np.empty_like(rows)
        ops.rmsnorm(rows, self.output_norm, a.norm_eps, out)
        if self.head is None:
            logits = self.output.matmul(Acts(out))  # (T or 1, n_vocab)
        else:  # the hot/cold head: row i's context is the cache and ids up to its token
            computed = self.head.computed if self.trace is not None else 0
            logits = self.head(Acts(out), self.cached, ids)
        if self.trace is not None:  # the head's rows computed exactly, for the tokens whose logits were made
            share = 1.0 if self.head is None else (len(self.head.hot) + (self.head.computed - computed) /
                                                   len(rows)) / a.n_vocab
            self.trace.end([0.0] * (len(ids) - len(rows)) + [share] * len(rows))
        if not ops.all_finite(logits):  # a head row of NaN or Inf: said here, not left to the sampler
            raise SparserunError(f"{self.path}: the output head's logits turned non-finite (NaN or Inf): the file's "
                                 "weights may hold NaN, Inf or garbage (--check-tensors checks them at load)")
        if a.final_softcap:
            c = np.float32(a.final_softcap)
            np.multiply(np.tanh(logits / c), c, out=logits)
        return logits

    def eval(self, ids, all_logits=False, shift=False):
        """Extend the cached context to exactly `ids`, processing only what is not cached yet.

        Reuses the longest common prefix of the cache and ids (so a chat turn processes its new tokens
        only). Returns logits of the processed tokens (all_logits) or of the last token, (1, n_vocab).
        At least the last token is always recomputed so its logits exist. shift: where ids is the cached context
        with a span cut out after a prefix, shift the cache instead of recomputing the rest (_shift_to).
        """
        ids = [int(t) for t in ids]
        if not ids:
            raise SparserunError("nothing to evaluate: empty token list")
        if len(ids) > self.n_ctx:
            raise ContextFullError(self.n_ctx, len(ids))
        n = common_prefix(self.cached, ids, limit=0 if all_logits else len(ids) - 1)
        if shift and not all_logits and n < len(self.cached):
            n = self._shift_to(ids, n)
        if len(self.cached) - n > self.kv.rewind_limit:  # a window's ring no longer holds the keys before n
            n = 0
        bad = [t for t in ids[n:] if not 0 <= t < self.args.n_vocab]  # cached ids were checked when they came in
        if bad:
            raise SparserunError(f"token id {bad[0]} out of range for a vocabulary of {self.args.n_vocab}")
        del self.cached[n:]
        self.last_processed = len(ids) - n  # tokens this call computes (the rest came from the cache)
        numba.set_num_threads(self.threads)
        outs = []
        for s in range(n, len(ids), self.n_batch):
            chunk = np.array(ids[s:s + self.n_batch], np.int64)
            last = s + len(chunk) == len(ids)
            if all_logits or last:
                outs.append(self._forward(chunk, s, all_logits))
            else:
                self._forward(chunk, s, False)
            self.cached.extend(int(t) for t in chunk)
        return np.concatenate(outs) if len(outs) > 1 else outs[0]

    def _shift_to(self, ids, n):
        """Where ids is the cached context with a span after its first n tokens cut out (a chat dropping its oldest
        turns), move the cache to match instead of recomputing what follows the cut: the kept keys are rotated back
        by the span's length (ops.shift_kv). As llama.cpp's context shift, this is an approximation: the kept
        tokens' keys and values were computed while the dropped ones were in context. eval(shift=True) asks for
        it (chat and serve do). Returns the new common prefix."""
        c = self.cached
        if any(L.gpu_attn is not None for L in self.layers):  # a device cache of its own: recompute
            return n
        for d in range(1, len(c) - n):
            rest = len(c) - n - d  # cached tokens after the span
            if c[n + d] == ids[n] and rest < len(ids) - n and c[n + d:] == ids[n:n + rest]:
                for li, L in enumerate(self.layers):
                    ops.shift_kv(self.kv.k[li], self.kv.v[li], n, d, len(c), L.rope_inv_freq, self.args.rope_dim,
                                 self.args.rope_type == arch.ROPE_NEOX)
                del c[n:n + d]
                return common_prefix(c, ids, limit=len(ids) - 1)
        return n

    def logits(self, ids):
        """Logits (len(ids), n_vocab) float32, one row per position, in a fresh context."""
        self.reset()
        return self.eval(ids, all_logits=True)

    def reset(self):
        self.kv.tokens.clear()

    # ---- generation ----
    def generate(self, prompt, max_tokens=128, **sampling):
        """Yield text pieces of the continuation of `prompt` (a string or token ids). See generate.py."""
        from .generate import generate

        yield from generate(self, prompt, max_tokens=max_tokens, **sampling)

    def info(self):
        from .info import model_info

        return model_info(self.gguf, self.args, self.path)


def check_tensor_data(f):
    """llama.cpp's --check-tensors: every tensor's values dequantized and checked finite (NaN / Inf values or block
    scales), before anything runs; a one-line error naming the first bad tensor and row."""
    from .kernels import quant as K

    for name in f.tensor_names:
        t = f.tensor(name)
        r = K.nonfinite_row(t.raw, t.row_bytes, t.qtype, t.rows, t.cols)
        if r >= 0:
            raise ModelFileError(f.path, f"tensor {name!r} holds a non-finite value (NaN or Inf) in row {r}")


def split_rows(w, rows):
    """Weight w as consecutive row blocks of the given heights (views of its bytes, so they stay one stream)."""
    out, r0 = [], 0
    for n in rows:
        out.append(w.row_block(r0, n))
        r0 += n
    return out


def in_memory_bytes(f):
    """Bytes the loader copies into memory at most: every matrix but the embedding (read a row at a time, in place)."""
    total = 0
    for name in f.tensor_names:
        try:
            t = f.tensor(name)
        except SparserunError:  # unsupported or broken: an error when (if) the model uses it
            continue
        if t.rows > 1 and name != "token_embd.weight":
            total += t.raw.nbytes
    return total


def common_prefix(a, b, limit=None):
    """Length of the common prefix of token lists a and b, at most `limit`."""
    n, end = 0, min(len(a), len(b), len(b) if limit is None else limit)
    while n < end and a[n] == b[n]:
        n += 1
    return n


class ContextFullError(SparserunError):
    def __init__(self, n_ctx, needed):
        super().__init__(f"context full: {needed} tokens do not fit in n_ctx={n_ctx} (start a new context or raise --ctx)")
        self.n_ctx, self.needed = n_ctx, needed


def load(path, threads=None, n_ctx=2048, n_batch=256, sparsity=None, predictor=None, device=None,
         vram_budget=None, placement=None, profile=None, err=sys.stderr, kv_type="f16", check_tensors=False,
         head="dense"):
    """Load a GGUF model: sparserun.load(path, threads=None, n_ctx=2048, sparsity=None, head="dense").

    sparsity: a policy spec (sparsity.py); None: "dense", or for a PowerInfer (PWRI) file its own predictors.

    head: "dense", or "hot[:K]" (head.py): K rows of the output head computed exactly every token, the rest
    estimated and the best of them computed (the hot set from the model's profile when there is one).
    kv_type: the KV cache's type, "f16" (as llama.cpp by default) or "f32" (exact; twice the memory). Attention
    placed on a GPU keeps a float32 cache there. check_tensors: check every tensor's values are finite at load (as
    llama.cpp's --check-tensors; without it a forward pass that turns non-finite is an error naming the layer).

    device: "cpu", "cuda" or "auto" (None: auto when vram_budget is given, else cpu); vram_budget in GiB
    (None with a GPU: the whole model); placement: a `sparserun place` file; profile: the profile that an
    on-the-fly placement ranks neurons by (default <model>.gguf.profile.gguf when it exists). See hybrid.py."""
    t0 = time.perf_counter()
    m = Model(path, threads=threads, n_ctx=n_ctx, n_batch=n_batch, sparsity=sparsity, predictor=predictor,
              kv_type=kv_type, check_tensors=check_tensors)
    m.set_head(head, profile)
    if device is not None or vram_budget is not None or placement is not None:
        from .hybrid import install, make_placement, resolve_device

        if resolve_device(device, vram_budget if placement is None else 0, err) == "cuda":
            install(m, make_placement(m, vram_budget, placement, profile))
    m.load_seconds = time.perf_counter() - t0
    return m
