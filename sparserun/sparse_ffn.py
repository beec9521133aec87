"""The sparse FFN: computes only the kept neurons of each token (see sparsity.py for the policies).

Decode (one token), gated FFN (SwiGLU / ReGLU), CATS-style:
    a = act(W_gate x)                      dense gate                     (n_ff,)
    idx = select(|a|)                      policy                         (n,)
    h = a[idx] * (W_up[idx] x)             } one kernel over the neuron   (n,)
    y = sum_j h[j] * W_down[:, idx[j]]     } pack (ffn_pack.py)           (dim,)
Non-gated FFN: a = act(W_up x), h = a[idx], and the kernel reads only the down columns. Threshold policies
run all four steps in one kernel (select_pack_ffn: the dense gate stream hides the kept units' latency).
With a predicted neuron set (predictor policies) the pack holds the gate rows too, so all three matrices are
read for the predicted neurons alone, in one pass. A predictor is a callable (layer, acts: the FFN's weights.Acts of T
tokens) -> list of T int arrays of ids.

Prompt batches (T > 1), and decode tokens that keep more than DENSE_ABOVE (predicted sets:
PREDICTED_DENSE_ABOVE) of the neurons (where the pack kernels stop paying: benchmarks/ffn_kernels.py),
run the dense kernels and zero the dropped neurons per token (activate_masked): the same selection,
exact, with the original weights.

With `cpu_neurons` (the CPU/GPU hybrid, hybrid.py) the FFN computes only the neurons it owns: its gate
(and, for the dense paths, up) rows are gathered once into contiguous copies, selection runs over the owned
neurons alone, and the result is the owned neurons' part of the FFN output (the GPU adds the rest).
"""
import os

import numpy as np

from . import cache
from .ffn_pack import NeuronPack, cache_root, part_sums
from .kernels import ops
from .kernels import sparse as S
from .weights import Acts, Matmuls

DENSE_ABOVE = 0.4  # kept fraction above which the masked dense kernels are cheaper than the pack
# The same for a predicted set (gate, up and down all read from the pack, page-sized units): the pack costs
# 0.57 of the dense FFN at 0.5 kept, 0.82 at 0.75, 1.03 at 0.9 (benchmarks/ffn_kernels.py, TinyLlama Q4_0)
PREDICTED_DENSE_ABOVE = 0.85
NO_COEF = np.empty(0, np.float32)  # the pack kernel's coef for modes that take none


class SparseFFN:
    def __init__(self, model, policy, predictor=None, cpu_neurons=None):
        a = model.args
        if predictor is None:  # --sparsity predictor[:FILE]; None for the policies that select by activation
            predictor = policy.predictor(model)
        self.model, self.policy, self.predictor = model, policy, predictor
        self.n_ff, self.act_id = a.n_ff, model.act_id
        self.param = policy.layer_params(a.n_layer, a.n_ff)  # per layer: what policy.select needs
        # decode tokens of a policy that allows it go straight to the fused kernel (_selected)
        self.fused = policy.fused_decode and predictor is None
        self.cache_dir = os.path.join(cache_root(), model.gguf.fingerprint()[:32])
        # predictor policies gather the gate too, so their packs hold it; CATS computes it densely
        self.pack = [NeuronPack(L.w_gate if predictor is not None else None, L.w_up, L.w_down, self.cache_dir, i)
                     for i, L in enumerate(model.layers)]
        cache.touch(self.cache_dir, model.path)  # this model's entry was used now: the last to be evicted
        cache.evict(keep=self.cache_dir)
        self.idx = np.empty(a.n_ff, np.int64)  # (n_ff,) kept neuron ids, first n valid
        self.kept = np.zeros(a.n_layer)  # sum over tokens of the kept fraction, per layer
        self.tokens = np.zeros(a.n_layer)
        # the neurons this FFN owns, per layer: all of them, or the hybrid's CPU share
        self.own = [None] * a.n_layer  # None: all; else sorted global ids (n_own,)
        self.local = [None] * a.n_layer  # None: identity; else (n_ff,) global id -> position in own, -1 if not owned
        self.gate_w = [L.w_gate for L in model.layers]
        self.up_w = [L.w_up for L in model.layers]
        self.gid = [np.arange(a.n_ff, dtype=np.int64)] * a.n_layer  # global neuron id of each owned row
        self.last_kept = np.zeros(a.n_layer)  # kept fraction of the previous decode token, per layer
        if cpu_neurons is not None:
            for li, (L, ids) in enumerate(zip(model.layers, cpu_neurons)):
                ids = np.ascontiguousarray(ids, np.int64)
                if len(ids) == a.n_ff:
                    continue
                self.own[li] = self.gid[li] = ids
                self.local[li] = np.full(a.n_ff, -1, np.int64)
                self.local[li][ids] = np.arange(len(ids))
                self.gate_w[li] = L.w_gate.subset(ids) if L.w_gate is not None else None
                self.up_w[li] = L.w_up.subset(ids)
        self.up_gate = [Matmuls([u] + ([g] if g is not None else [])) for u, g in zip(self.up_w, self.gate_w)]
        if self.fused:  # select_pack_ffn's per-layer arguments: selection rows (gate, or up when not gated)
            self.sel = [P.selected_args(g if g is not None else u, gid, t, self.act_id, g is not None)
                        for P, g, u, gid, t in zip(self.pack, self.gate_w, self.up_w, self.gid, self.param)]

    def reset_stats(self):
        self.kept[:] = 0
        self.tokens[:] = 0

    def kept_fraction(self):
        return self.kept / np.maximum(self.tokens, 1)

    def _act(self, x):
        out = np.empty_like(x)
        ops.ffn_activate(x[:0], x, self.act_id, out)  # non-gated form: out = act(x)
        return out

    def _owned(self, li, ids):
        """The owned part of a predicted (global) neuron set, as contiguous int64."""
        ids = np.ascontiguousarray(ids, np.int64)
        return ids if self.local[li] is None else ids[self.local[li][ids] >= 0]

    def _global(self, li, ids):
        """Owned positions ids as global neuron ids."""
        return ids if self.own[li] is None else self.own[li][ids]

    def _to_global(self, li, idx, n):
        if self.own[li] is not None:
            idx[:n] = self.own[li][idx[:n]]

    def __call__(self, li, acts):
        L = self.model.layers[li]
        T = acts.x.shape[0]
        trace = self.model.trace
        if self.fused and T == 1 and self.last_kept[li] <= DENSE_ABOVE and not (trace is not None and trace.ids):
            return self._selected(li, L, acts)  # (its kernel keeps the ids to itself: a trace of ids goes below)
        predicted = self.predictor(li, acts) if self.predictor is not None else None
        if predicted is not None:
            predicted = [self._owned(li, p) for p in predicted]
        if T > 1 or self.policy.is_dense and predicted is None or (
                predicted is not None and len(predicted[0]) > PREDICTED_DENSE_ABOVE * self.n_ff):
            return self._masked(li, L, acts, predicted)
        idx = self.idx
        mode = S.COEF_TIMES_DOT
        coef = NO_COEF
        if predicted is not None:  # the predicted (global) ids go to the kernel as they are
            idx = predicted[0]
            n = len(idx)
            mode = S.GATED_DOTS if L.w_gate is not None else S.ACT_OF_DOT
        else:
            a = self._act((self.gate_w[li] if L.w_gate is not None else self.up_w[li]).matmul(acts))[0]  # (n_own,)
            n = self.policy.select(a, self.param[li], idx)
            if n > DENSE_ABOVE * self.n_ff:
                up = self.up_w[li].matmul(acts)[0] if L.w_gate is not None else None
                return self._dense_rest(li, L, acts, a, idx[:n], up)
            coef = a[idx[:n]]  # act(gate) (gated) or the activation itself (non-gated)
            if L.w_gate is None:
                mode = S.AXPY_ONLY
            self._to_global(li, idx, n)
        f = n / self.n_ff
        self._count(li, n, {S.COEF_TIMES_DOT: (1.0, f), S.AXPY_ONLY: (None, 1.0), S.GATED_DOTS: (f, f),
                            S.ACT_OF_DOT: (None, f)}[mode] if trace is not None else None, idx[:n])
        out = np.empty((1, L.w_down.rows), np.float32)
        self.pack[li].run(acts, idx, n, coef if coef is NO_COEF else np.ascontiguousarray(coef, np.float32), mode,
                          self.act_id, out[0])
        return out

    def _count(self, li, n, read=None, ids=None):
        """One token kept n neurons of layer li. read: (gate, up) shares of rows read (None: every row; a gate of
        None: the FFN has none) and ids the kept (global) ids, for a trace (the down columns read are the kept)."""
        self.last_kept[li] = n / self.n_ff
        self.kept[li] += n / self.n_ff
        self.tokens[li] += 1
        if self.model.trace is not None:
            g, u = read if read is not None else (1.0, 1.0)
            shares = {"attn": 1.0, "ffn_up": u, "ffn_down": n / self.n_ff if read is not None else 1.0}
            if g is not None and self.model.layers[li].w_gate is not None:
                shares["ffn_gate"] = g
            self.model.trace.layer(li, n / self.n_ff, shares, ids)

    def _selected(self, li, L, acts):
        """A threshold policy's decode token: selection rows, keep rule and pack in one kernel. Used while the
        layer's previous token kept at most DENSE_ABOVE; above that the unfused path decides per token, and
        the masked dense kernels run when they are cheaper."""
        dim = L.w_down.rows
        out = np.empty((1, dim), np.float32)
        n = S.select_pack_ffn(*self.sel[li], acts.x, part_sums(dim), out[0])
        gated = L.w_gate is not None
        self._count(li, n, (1.0, n / self.n_ff) if gated else (None, 1.0))
        return out

    def _scatter(self, li, h):
        """(T, n_own) -> (T, n_ff) with zeros on the neurons not owned (the down matmul reads all columns)."""
        if self.own[li] is None:
            return h
        full = np.zeros((h.shape[0], self.n_ff), np.float32)
        full[:, self.own[li]] = h
        return full

    def _dense_rest(self, li, L, acts, a, keep, u):
        """One token keeping many neurons: up and down densely, dropped ones zeroed (a, keep, u: owned space)."""
        h = np.zeros_like(a)
        up = None if u is None else (np.maximum(u[keep], 0) if self.act_id == ops.RELU_SYM else u[keep])
        h[keep] = a[keep] if u is None else a[keep] * up  # non-gated: h = act(up), already in a
        self._count(li, len(keep), ids=self._global(li, keep))
        return L.w_down.matmul(Acts(self._scatter(li, h[None])))

    def _masked(self, li, L, acts, predicted):
        """Prompt batch (or the dense policy): dense matmuls over the owned neurons, dropped neurons zeroed per
        token (the same selection as decode)."""
        u, *g = self.up_gate[li](acts)  # (T, n_own) each
        g = g[0] if g else u[:0]
        h = np.empty_like(u)  # (T, n_own)
        mask = self.policy.mask_args(self.param[li]) if predicted is None else None
        if mask is not None:  # activation and mask in one pass
            counts = np.empty(h.shape[0], np.int64)
            S.activate_masked(g, u, self.act_id, *mask, h, counts)
            ids = self.model.trace is not None and self.model.trace.ids
            for t, n in enumerate(counts):
                self._count(li, int(n), ids=self._global(li, np.flatnonzero(h[t])) if ids else None)
            return L.w_down.matmul(Acts(self._scatter(li, h)))
        ops.ffn_activate(g, u, self.act_id, h)
        if predicted is None:  # a policy that keeps every neuron
            for _ in range(h.shape[0]):
                self._count(li, h.shape[1], ids=self._global(li, np.arange(h.shape[1])))
        else:  # predicted neuron sets
            for t in range(h.shape[0]):
                keep = predicted[t] if self.local[li] is None else self.local[li][predicted[t]]
                self._count(li, len(keep), ids=predicted[t])
                if len(keep) == h.shape[1]:  # every owned neuron: nothing to zero
                    continue
                kept = h[t, keep]
                h[t] = 0.0
                h[t, keep] = kept
        return L.w_down.matmul(Acts(self._scatter(li, h)))
