"""Input sparsity on every matrix (TEAL-style): a matrix reads only the input channels whose magnitude passes its
threshold, so a skipped channel skips one column of the matrix (its weights across all outputs).

    y = W x  ~  sum over kept j of x_j * W[:, j]        kept: |x_j| > t(layer, input)

Four inputs per layer, each with its own threshold (GROUPS): the attention block's normalized input (read by q, k
and v together), attention's output (read by o), the FFN's normalized input (gate and up together) and the FFN's
hidden activations (down). Thresholds come from calibration (calibrate_teal): the share of the layers' weight bytes
skipped meets the target S, spread over every layer and input greedily by the error each adds to its matrices'
outputs, weighed by how much that input moves the model's output (or uniformly). The first position (BOS: the
attention sink) always runs dense.

Each input runs from one of two layouts, chosen when the policy is installed from the share its threshold dropped on
the calibration text (InputSparsity.columns). Where it keeps at most COLUMNS_BELOW of the channels, column packs: the
matrices that share the input, stacked and stored column by column (one unit per input channel: its weights for
every output of q|k|v, or gate|up, re-quantized per 32 values in the neuron packs' down formats,
ffn_pack.quantize_columns; a stack is split where that format changes). A decode token adds its kept channels' units
(kernels.columns.column_axpy), a short prompt batch runs every unit once for all its tokens (column_matmul), and the
rows of those matrices are given back to the OS (weights.Weight.release): the model holds each matrix once. A prompt
batch of PROMPT_ROWS tokens or more reads each matrix's rows back from the file for its call (Weight.restore) and runs
the dense kernels on the masked input, then gives them back: one layer's rows more in memory at a time. Elsewhere the
dense kernels run on the input with the dropped channels zeroed (the file's own weights). Float32 columns (F32
models) run through the neuron packs' pack_ffn, a token at a time. Column packs are cached beside the neuron packs and
loaded into memory when the policy is installed (InputSparsity.load_packs).

Composition: `teal:S` alone covers all four inputs; `teal:S+POLICY` (e.g. teal:0.4+threshold:0, teal:0.4+predictor)
covers attention's two and leaves the FFN to POLICY (sparse_ffn.py), whose kernels read the FFN's own packs.
"""
import os
import sys

import numpy as np
from numba import njit

from .errors import SparserunError
from .side_files import PROFILE, TEAL
from .ffn_pack import DOWN_KINDS, FOUR_BIT, cache_root, cached_units, part_sums, quantize_columns, unit_stride
from .kernels import ops
from .kv_cache import KVCache
from .kernels import quant as K
from .kernels import columns as C
from .kernels import sparse as S
from .memory import discard
from .weights import Acts, Weight

GROUPS = ("attn_qkv", "attn_o", "ffn_gate_up", "ffn_down")
QKV, O, GATE_UP, DOWN = range(4)
ATTENTION = (QKV, O)
# An input whose threshold kept more than this share of its channels on the calibration text runs the dense kernels on
# the masked input (its rows) instead of column packs: the columns stream at 0.75-0.87 of a sequential read and are
# re-quantized, so near dense they lose
COLUMNS_BELOW = 0.7
# A prompt batch of at least this many tokens runs through the rows of a column input's matrices, read back from the
# file (repacked) for the call and given back after it, rather than from its columns: 64 tokens' batch through the
# columns ran at 0.45-0.5x the dense batch (a channel's weights are added token by token). TinyLlama Q4_0 at teal 50%,
# `sparserun bench -p P -n 0 -r 5 --modes sparse`, columns / rows t/s: P = 16 55.9 / 34.7, 32 60.9 / 51.8, 64
# 63.8 / 71.5, 128 63.3 / 98.1 (the rows' fixed cost is the repacking, 0.2-0.3 s for the whole model).
PROMPT_ROWS = 48
NO_X = np.zeros((1, K.QK), np.float32)  # pack_ffn's x, unread in AXPY_ONLY mode


@njit(cache=True)
def mask_inputs(x, t, first, out, counts):
    """out = x with |x| <= t zeroed per row, rows before `first` kept whole (BOS); counts[r] = kept channels."""
    for r in range(x.shape[0]):
        n = 0
        for j in range(x.shape[1]):
            v = x[r, j]
            if r < first or abs(v) > t:
                out[r, j] = v
                n += 1
            else:
                out[r, j] = 0.0
        counts[r] = n


EXACT_Q4 = -1  # a column pack kind beside the neuron packs' down formats: the source's own nibbles and scales
EXACT_SOURCES = (K.Q4_0, K.Q4_K)  # the file types exact 4-bit columns are made from


def _source(w):
    """The file's own weight under an in-memory (perhaps repacked) copy."""
    return w.origin if getattr(w, "origin", None) is not None else w


def _column_kind(weights):
    qtypes = {w.qtype for w in weights}
    if all(isinstance(w, Weight) and _source(w).qtype in EXACT_SOURCES for w in weights):
        return EXACT_Q4
    return S.DOWN_F32 if qtypes == {K.F32} else S.DOWN_Q4 if qtypes <= set(FOUR_BIT) else S.DOWN_Q8


def exact_q4_parts(w):
    """A Q4_0 or Q4_K matrix's own parts from the file's bytes: nibbles q (rows, cols) uint8 and, per row and block of
    32 columns, s and m (rows, cols / 32) float32 with w = s (q - 8) - m (Q4_0: s = d, m = 0; Q4_K: s = d sc, m =
    dmin mn - 8 s)."""
    src = _source(w)
    raw = src.raw.reshape(src.rows, src.row_bytes)
    if src.qtype == K.Q4_0:
        blk = raw.reshape(src.rows, -1, 18)
        d = blk[:, :, :2].copy().view(np.float16)[..., 0].astype(np.float32)  # (rows, cols / 32)
        qs = blk[:, :, 2:]
        q = np.concatenate([qs & 15, qs >> 4], axis=2).reshape(src.rows, src.cols)
        return q, d, np.zeros_like(d)
    sb = raw.reshape(src.rows, -1, 144)  # Q4_K super-blocks: d, dmin (fp16), 12 bytes of 6-bit scales and mins, 128 of nibbles
    d = sb[:, :, 0:2].copy().view(np.float16)[..., 0].astype(np.float32)[..., None]  # (rows, n_sb, 1)
    dmin = sb[:, :, 2:4].copy().view(np.float16)[..., 0].astype(np.float32)[..., None]
    sc6 = sb[:, :, 4:16].astype(np.int32)
    sc = np.concatenate([sc6[..., 0:4] & 63, (sc6[..., 8:12] & 15) | ((sc6[..., 0:4] >> 6) << 4)], axis=2)
    mn = np.concatenate([sc6[..., 4:8] & 63, (sc6[..., 8:12] >> 4) | ((sc6[..., 4:8] >> 6) << 4)], axis=2)
    qs = sb[:, :, 16:].reshape(src.rows, -1, 4, 32)  # pairs of sub-blocks: low nibbles the first, high the second
    q = np.stack([qs & 15, qs >> 4], axis=3).reshape(src.rows, src.cols)
    s_ = (d * sc).reshape(src.rows, -1)
    return q, s_, (dmin * mn).reshape(src.rows, -1) - 8.0 * s_


class ColumnPack:
    """The matrices that read one input, stacked (n_out rows in all) and stored column by column: unit j = input
    channel j's weights for every output, in a neuron-pack down format (f32 exact; q4 for 4-bit sources; int8 else)."""

    def __init__(self, weights, cache_dir, layer, group, first=0):
        self.n_in, self.n_out = weights[0].cols, sum(w.rows for w in weights)
        self.kind = _column_kind(weights)
        used = self.n_out // 2 if self.kind == EXACT_Q4 else S.down_bytes.py_func(self.kind, self.n_out)
        self.stride = unit_stride(used)
        self.bounds = np.cumsum([0] + [w.rows for w in weights])  # each matrix's first output, then n_out
        types = "-".join(dict.fromkeys(_source(w).type_name if self.kind == EXACT_Q4 else w.type_name
                                       for w in weights))
        kind = "q4x" if self.kind == EXACT_Q4 else DOWN_KINDS[self.kind]
        stem = f"cols.{layer}.{GROUPS[group]}.{first}.{types}-{kind}"  # first: its place in the group
        path = os.path.join(cache_dir, stem + ".p4.npy")
        self.sc = self.mn = None
        if self.kind == EXACT_Q4:
            parts = []

            def build():  # the nibbles column by column; the scales kept for the second file
                qs, ss, ms = zip(*(exact_q4_parts(w) for w in weights))
                q = np.concatenate(qs).T.reshape(self.n_in, -1, 2, 16)  # (n_in, n_out / 32, halves, 16)
                parts.append(np.stack([np.concatenate(ss).T, np.concatenate(ms).T]).astype(np.float16))
                for w in weights:
                    discard(_source(w).raw, inner=False)  # the file's pages: read once for the build
                return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(self.n_in, -1)  # Q4_0's order: k low, k + 16 high

            self.units = cached_units(path, stem, (self.n_in, self.stride), build)
            self.has_m = any(_source(w).qtype != K.Q4_0 for w in weights)  # Q4_0's offsets are 0: not stored
            n_rows = (2 if self.has_m else 1) * (self.n_in // K.QK)  # (s; m where has_m) x blocks, n_out fp16 each
            scales = cached_units(os.path.join(cache_dir, stem + "-scales.p5.npy"), stem + "-scales",
                                  (n_rows, 2 * self.n_out),
                                  lambda: np.ascontiguousarray((parts[0] if parts else self._scales(weights))
                                                               [:n_rows // (self.n_in // K.QK)]).reshape(n_rows, -1)
                                  .view(np.uint8))
            half = (self.n_in // K.QK) * 2 * self.n_out
            self.sc = scales[:half]
            self.mn = scales[half:] if self.has_m else self.sc  # (the kernel reads it only where has_m)
        else:
            def build():  # (n_in, n_out) float32, filled a block of rows at a time (no second float copy), quantized
                wt = np.empty((self.n_in, self.n_out), np.float32)
                for w, at in zip(weights, self.bounds):
                    whole = None if isinstance(w, Weight) else w.dequantize()  # a TransposedWeight: at once
                    for r0 in range(0, w.rows, 1024):
                        ids = np.arange(r0, min(w.rows, r0 + 1024))
                        rows = w.rows_f32(ids) if whole is None else whole[ids]  # (<= 1024, n_in)
                        wt[:, at + r0:at + r0 + len(rows)] = rows.T
                return quantize_columns(wt, self.kind)

            self.units = cached_units(path, stem, (self.n_in, self.stride), build)
        self.fused = self.kind != S.DOWN_F32  # kernels.columns' integer axpys (float32 columns: pack_ffn's)

    @staticmethod
    def _scales(weights):
        """The scales' stack (2, n_in / 32, n_out) fp16, from the file (units cached, scales not)."""
        ss, ms = zip(*(exact_q4_parts(w)[1:] for w in weights))
        for w in weights:
            discard(_source(w).raw, inner=False)  # the file's pages: read once for the build
        return np.stack([np.concatenate(ss).T, np.concatenate(ms).T]).astype(np.float16)

    @staticmethod
    def fits(weights):
        return sum(w.rows for w in weights) % K.QK == 0  # the axpys work in whole blocks of 32 outputs

    @staticmethod
    def for_group(weights, cache_dir, layer, group):
        """The column packs of one input's matrices: one per run of matrices whose columns take the same format (a
        Q4_K_M file's q and k are 4-bit, its v may be Q6_K: int8 columns for v alone, 4-bit ones for q|k), or None
        where a run's outputs are not whole blocks of 32."""
        runs, at = [], 0
        for w in weights:
            if runs and _column_kind(runs[-1][1]) == _column_kind([w]):
                runs[-1][1].append(w)
            else:
                runs.append((at, [w]))
            at += 1
        if not all(ColumnPack.fits(ws) for _, ws in runs):
            return None
        return [ColumnPack(ws, cache_dir, layer, group, first) for first, ws in runs]

    def run_batch(self, x, t, first):
        """(outputs [(T, rows) per matrix, C-contiguous], kept counts (T,)) of a prompt batch x (T, n_in): token r adds
        its channels with |x[r, j]| > t (rows before `first`: every channel)."""
        T = x.shape[0]
        out, counts = np.empty((T, self.n_out), np.float32), np.empty(T, np.int64)
        if self.kind == EXACT_Q4:
            C.column_matmul_exact(self.units, self.stride, self.n_out, np.ascontiguousarray(x), t, first, self.sc,
                                  self.mn, self.has_m, out, counts)
        elif self.fused:
            C.column_matmul(self.units, self.stride, self.kind, self.n_out, np.ascontiguousarray(x), t, first, out,
                            counts)
        else:  # one token at a time through run()
            idx, coef = np.empty(self.n_in, np.int64), np.empty(self.n_in, np.float32)
            for r in range(T):
                o, counts[r] = self.run(x[r], np.float32(-1.0) if r < first else t, idx, coef)
                out[r] = np.concatenate([a[0] for a in o])
        return [np.ascontiguousarray(out[:, a:b]) for a, b in zip(self.bounds[:-1], self.bounds[1:])], counts

    def run(self, x, t, idx, coef):
        """(outputs [(1, rows) per matrix], kept) = sum over the channels j with |x[j]| > t of x[j] * column j; idx and
        coef: scratch of x's size (x (n_in,))."""
        out = np.empty((1, self.n_out), np.float32)
        if self.kind == EXACT_Q4:
            n = C.column_axpy_exact(self.units, self.stride, self.n_out, x, t, idx, coef, self.sc, self.mn, self.has_m,
                                    part_sums(self.n_out), out[0])
        elif self.fused:  # selection and axpys in one call
            n = C.column_axpy(self.units, self.stride, self.kind, self.n_out, x, t, idx, coef, part_sums(self.n_out),
                              out[0])
        else:  # the neuron packs' kernel: threads split the columns, each into a partial sum
            n = S.select_threshold(x, t, idx)
            coef[:n] = x[idx[:n]]
            S.pack_ffn(self.units, self.stride, 0, 0, K.F32, K.F32, K.HAS_VNNI, self.kind, self.n_out, idx, n, coef,
                       S.AXPY_ONLY, 0, NO_X, part_sums(self.n_out), out[0])
        return [out[:, a:b] for a, b in zip(self.bounds[:-1], self.bounds[1:])], n


class InputSparsity:
    """Per layer and input (GROUPS) a threshold; __call__ runs the matrices of one input under it. thresholds:
    (n_layer, 4), -1 keeps every channel; groups: the inputs covered (the others run dense); dropped: (n_layer, 4)
    the share of each input's channels its threshold dropped on the calibration text, or None.

    Each covered input runs from one layout (`columns`, decided here): its column packs where the threshold is
    expected to keep at most COLUMNS_BELOW of the channels (every input with a threshold where dropped is None), else
    the dense kernels on the masked input. columns=True / False forces one layout for every covered input."""

    def __init__(self, model, thresholds, groups=range(4), dropped=None, columns=None):
        a = model.args
        self.model = model
        self.t = np.asarray(thresholds, np.float32).reshape(a.n_layer, len(GROUPS))
        self.groups = frozenset(groups)
        covered = np.zeros(self.t.shape, bool)
        covered[:, sorted(self.groups)] = True
        if columns is None:
            columns = self.t >= 0
            if dropped is not None:
                columns &= 1.0 - np.asarray(dropped).reshape(self.t.shape) <= COLUMNS_BELOW
        self.columns = covered & columns  # (n_layer, 4) inputs that read column packs
        self.cache_dir = os.path.join(cache_root(), model.gguf.fingerprint()[:32])
        self.packs = {}  # (layer, group) -> [ColumnPack] (None: no column path): load_packs, or at first use
        width = max(a.dim, a.n_ff, a.n_head * a.head_dim)
        self.idx, self.coef = np.empty(width, np.int64), np.empty(width, np.float32)  # the kept channels' scratch
        self.pos0 = 0  # the first position of the pass running now (Model._forward sets it): position 0 runs dense
        self.records = None  # calibration: per layer and group, a list of the inputs seen (record())
        self.reset_stats()

    def reset_stats(self):
        self.kept = np.zeros((len(self.t), len(GROUPS)))  # sum over tokens of the kept share
        self.tokens = np.zeros((len(self.t), len(GROUPS)))

    def kept_share(self):
        """(n_layer, 4): the mean kept share of each input over the tokens run since reset_stats."""
        return self.kept / np.maximum(self.tokens, 1)

    def record(self):
        """From now on keep every input seen (after position 0) for calibration, in self.records[layer][group]."""
        self.records = [[[] for _ in GROUPS] for _ in self.t]

    def __call__(self, li, group, mats, x):
        """The outputs [(T, rows) per matrix] of mats (a weights.Matmuls) on input x (T, n_in) under layer li's
        threshold for this input."""
        T, n_in = x.shape
        first = 1 if self.pos0 == 0 else 0  # rows kept whole: BOS
        if self.records is not None and T > first:
            self.records[li][group].append(x[first:].copy())  # (2,048 tokens: 0.64 GB for Gemma 3 270M)
        if group not in self.groups:
            return mats(Acts(x))
        trace = self.model.trace
        t = self.t[li, group]
        if self.columns[li, group]:
            if (li, group) not in self.packs:  # this input's packs of every layer at once (see load_group)
                self.load_group(group, li, mats)
            packs = self.packs[li, group]
            if packs is not None:
                outs = []
                if T == 1 and not first:  # a decode token: only the kept channels' units are read
                    for pack in packs:
                        o, n = pack.run(x[0], t, self.idx, self.coef)
                        outs += o
                    self._count(li, group, (n / n_in,), trace)
                    return outs
                if T < PROMPT_ROWS:  # a short prompt batch, or BOS: every unit, each token's kept channels added
                    for pack in packs:
                        o, counts = pack.run_batch(x, t, first)
                        outs += o
                    self._count(li, group, counts / n_in, trace)
                    return outs
                # a longer batch: the rows, read back from the file for this call only (Matmuls.run restores them)
                released = [w for w in mats.weights if getattr(w, "released", False)]
                try:
                    return self._masked(li, group, mats, x, t, first, trace)
                finally:  # given back even when the pass fails (a non-finite layer): one copy of each matrix
                    for w in released:
                        w.release()
        return self._masked(li, group, mats, x, t, first, trace)

    def _masked(self, li, group, mats, x, t, first, trace):
        """The dense kernels of mats on x with the dropped channels zeroed."""
        T = x.shape[0]
        xm, counts = np.empty_like(x), np.empty(T, np.int64)  # (T, n_in) the kept channels, the rest zero
        mask_inputs(x, t, first, xm, counts)
        self._count(li, group, counts / x.shape[1], trace)
        return mats(Acts(xm))

    def load_packs(self, release=False):
        """Build or load the column packs of every column input in every layer whose attention runs here, before the
        first token (Model.make_ffn); release: give back the rows of the matrices they replace (weights.Weight.release:
        nothing else reads them until the policy changes), layer by layer, so the two copies are never both in
        memory. Built as each was first needed, they loaded inside timed decode (a bench's first repetition 23 t/s
        against 67 at teal 40% on TinyLlama Q4_0)."""
        for layer, L in enumerate(self.model.layers):
            for group in sorted(self.groups):
                if self.columns[layer, group] and not (group in ATTENTION and L.gpu_attn is not None):
                    weights = _group_weights(self.model, layer, group)
                    packs = self.packs[layer, group] = ColumnPack.for_group(weights, self.cache_dir, layer, group)
                    if packs is not None and release:
                        for w in weights:
                            if isinstance(w, Weight):
                                w.release()

    def load_group(self, group, li, mats):
        """Build or load one input's column packs in every layer not loaded yet (layer li's from mats where given,
        the matrices its caller runs): an InputSparsity used without load_packs (tests, calibration)."""
        for layer in range(len(self.t)):
            if (layer, group) not in self.packs:
                weights = mats.weights if layer == li and mats is not None else _group_weights(self.model, layer, group)
                self.packs[layer, group] = ColumnPack.for_group(weights, self.cache_dir, layer, group)

    def _count(self, li, group, shares, trace):
        self.kept[li, group] += sum(shares)
        self.tokens[li, group] += len(shares)
        if trace is not None:
            trace.inputs(li, GROUPS[group], shares)


class One:
    """One matrix as a weights.Matmuls of one (a down matrix may be a TransposedWeight, which Matmuls does not take)."""

    def __init__(self, w):
        self.w, self.weights = w, [w]

    def __call__(self, acts):
        return [self.w.matmul(acts)]


class TealFFN:
    """The FFN under `teal` alone (no FFN policy): gate|up and down through the input sparsity. Model.use_ffn takes it
    as it takes a SparseFFN; `inputs` also serves the attention block."""

    predictor = None

    def __init__(self, model, policy, inputs):
        self.model, self.policy, self.inputs = model, policy, inputs
        self.n_ff = model.args.n_ff
        self.down = [One(L.w_down) for L in model.layers]

    def reset_stats(self):
        self.inputs.reset_stats()

    def kept_fraction(self):
        """Per layer, the kept share of the FFN's hidden activations (down's input)."""
        return self.inputs.kept_share()[:, DOWN]

    def __call__(self, li, acts):
        L, m = self.model.layers[li], self.model
        u, *g = self.inputs(li, GATE_UP, L.up_gate, acts.x)  # (T, n_ff) each
        g = g[0] if g else u[:0]
        h = np.empty_like(u)  # (T, n_ff)
        ops.ffn_activate(g, u, m.act_id, h)
        if m.trace is not None:
            m.trace.dense(li, h.shape[0])  # the inputs' shares are merged into these entries
        return self.inputs(li, DOWN, self.down[li], h)[0]  # (T, dim)


# ---- thresholds: calibration and files ----

def builtin_text():
    """The text `teal:S` calibrates on when no thresholds file is given: Python's own documentation (pydoc's topics,
    shipped with every CPython), so it needs no download and no file of the project's."""
    import pydoc_data.topics as topics

    return "\n".join(topics.topics[k] for k in sorted(topics.topics))


def _group_weights(model, li, group):
    L = model.layers[li]
    return {QKV: [L.wq, L.wk, L.wv], O: [L.wo], GATE_UP: [L.w_up] + ([L.w_gate] if L.w_gate is not None else []),
            DOWN: [L.w_down]}[group]


def _bytes(weights):
    return float(sum(w.rows * w.cols for w in weights))


LEVELS = np.round(np.arange(0.0, 0.951, 0.025), 3)  # the sparsity steps the greedy allocation moves in
CALIBRATION_TOKENS = 2048  # of the built-in text, for `teal:S` (Gemma 3 270M, greedy 25%: +5.0% perplexity
# calibrated on 1024 tokens, +4.2% on 2048; +5.2% with the 2048 tokens' inputs rounded to float16: the allocation
# moves with small changes in its inputs)
PROBE = 0.5  # the level each input is probed at alone, end to end, to weigh its errors (teal_tables)


def _errors(w, x, levels):
    """Relative output error of dropping each level's share of the smallest |x| entries (one threshold for all rows
    of x, as at run time): ||(x * dropped) W^T||^2 / ||x W^T||^2 per level."""
    score = np.abs(x)
    ts = np.quantile(score, levels)
    ref = float(np.sum((x @ w.T) ** 2)) or 1.0
    return np.array([float(np.sum(((x * (score <= t)) @ w.T) ** 2)) / ref if s > 0 else 0.0
                     for s, t in zip(levels, ts)])


def allocate(errors, sizes, target, levels=LEVELS):
    """Greedy: levels (indices into LEVELS), one per input, whose byte-weighted mean share reaches target, each step
    taken where the error added per byte skipped is least. errors: per input, the error at each level (convex
    enough in practice: a step is judged by its own increment)."""
    at = np.zeros(len(errors), np.int64)
    sizes = np.asarray(sizes, float)
    need = target * sizes.sum() - 1e-9
    done = 0.0
    while done < need:
        nxt = np.minimum(at + 1, len(levels) - 1)
        gain = sizes * (levels[nxt] - levels[at])
        cost = np.array([e[n] - e[a] for e, n, a in zip(errors, nxt, at)])
        cost = np.where(gain > 0, cost / np.maximum(gain, 1e-30), np.inf)
        pick = int(np.argmin(cost))
        if not np.isfinite(cost[pick]):
            break
        done += gain[pick]
        at[pick] += 1
    return at


def _mean_kl(ref, logits):
    from .bench import log_softmax

    p, q = log_softmax(ref), log_softmax(logits)
    return float((np.exp(p) * (p - q)).sum(-1).mean())


def _run(model, thresholds, ids, record=False):
    """Logits (len(ids), n_vocab) of ids under these thresholds (prompt batches: the masked dense kernels), and the
    InputSparsity (recording its inputs when asked). The text runs in one context of its own, whatever the context the
    model was loaded with, up to the model's training context; longer text in windows of that, each a fresh context
    that starts with BOS again where the text did (its row dropped). (Gemma 3 270M, greedy 25% calibrated on 2048
    tokens: +3.8% perplexity in one context, +4.6% in windows of 512.)"""
    inputs = InputSparsity(model, thresholds, columns=False)  # the file's own weights, masked
    if record:
        inputs.record()
    width = max(1, min(len(ids), max(model.args.n_ctx_train, model.n_ctx)))
    saved = model.use_ffn(TealFFN(model, None, inputs))
    kv, n_ctx = model.use_cache(KVCache(model.args, width, model.n_batch, model.kv.kv_type)), model.n_ctx
    model.n_ctx = width
    bos = [ids[0]] if len(ids) and ids[0] == model.bos_id else []
    parts, at = [], 0
    try:
        while at < len(ids):
            head = bos if at > 0 else []
            window = list(ids[at:at + width - len(head)])
            parts.append(model.logits(head + window)[len(head):])
            at += len(window)
    finally:
        model.use_ffn(saved)
        model.use_cache(kv)
        model.n_ctx = n_ctx
    return np.concatenate(parts) if parts else np.zeros((0, model.n_vocab), np.float32), inputs


class TealTables:
    """What calibration measured, from which the thresholds of any target share follow at once (select): per layer
    and input (GROUPS), the |x| threshold that drops each LEVELS share of its channels on the calibration text, the
    error that adds (the input's relative output error, weighed by how much the model's output moves per unit of it:
    the mean KL against dense when that input alone runs at PROBE in every layer; None where only the uniform
    allocation was asked for), and the weight values each input's matrices hold. Kept in the profile (`sparserun
    profile`), in teal files (`sparserun calibrate --teal`) and, for `teal:S`, beside the packs."""

    def __init__(self, thresholds, errors, sizes, tokens, text, levels=LEVELS):
        self.levels = np.round(np.asarray(levels, np.float64), 6)  # (L,) shares of an input's channels dropped (stored
        # as float32: rounded back to the steps they were)
        self.thresholds = np.asarray(thresholds, np.float32)  # (n_layer, 4, L): |x| at or under which they drop
        self.errors = None if errors is None else np.asarray(errors, np.float32)  # (n_layer, 4, L) or None
        self.sizes = np.asarray(sizes, np.float32)  # (n_layer, 4) weight values read per input
        self.tokens, self.text = int(tokens), str(text)
        L = len(self.levels)
        if self.thresholds.ndim != 3 or self.thresholds.shape[1:] != (len(GROUPS), L) or \
                self.sizes.shape != self.thresholds.shape[:2] or \
                (self.errors is not None and self.errors.shape != self.thresholds.shape) or \
                not np.all(np.isfinite(self.thresholds)) or not np.all(np.isfinite(self.sizes)):
            raise ValueError(f"teal tables of shapes {self.thresholds.shape} / {self.sizes.shape} over {L} levels")

    def select(self, target, allocation="greedy"):
        """(thresholds (n_layer, 4) float32, shares (n_layer, 4) of each input's channels dropped) skipping the share
        `target` of the weight values. uniform: every input at target (its threshold interpolated between the two
        levels around it, exact on a level); greedy: allocate() over every layer and input at once."""
        if not 0.0 <= target < 1.0:
            raise SparserunError(f"teal: the target share must be in [0, 1), got {target}")
        if allocation not in ("greedy", "uniform"):
            raise SparserunError(f"teal: allocation must be greedy or uniform, got {allocation!r}")
        n_layer = len(self.thresholds)
        if target == 0.0:
            return np.full((n_layer, len(GROUPS)), -1.0, np.float32), np.zeros((n_layer, len(GROUPS)))
        if allocation == "uniform":
            t = np.array([[np.interp(target, self.levels, row) for row in layer] for layer in self.thresholds],
                         np.float32)
            return t, np.full((n_layer, len(GROUPS)), target)
        if self.errors is None:
            raise SparserunError("teal: these tables were calibrated for the uniform allocation only (no errors)")
        at = allocate(list(self.errors.reshape(n_layer * len(GROUPS), -1)), self.sizes.ravel(), target,
                      self.levels).reshape(n_layer, len(GROUPS))
        t = np.where(at > 0, np.take_along_axis(self.thresholds, at[..., None], 2)[..., 0], -1.0).astype(np.float32)
        return t, self.levels[at]

    def dropped(self, thresholds):
        """(n_layer, 4): the share of each input's channels that thresholds (n_layer, 4) dropped on the calibration
        text, interpolated between the levels (0 where a threshold keeps every channel)."""
        t = np.asarray(thresholds, np.float64)
        return np.array([[np.interp(t[li, g], self.thresholds[li, g], self.levels) if t[li, g] >= 0 else 0.0
                          for g in range(len(GROUPS))] for li in range(len(t))])

    # in a side file (the profile's or a teal file's): tensors and keys under "teal."
    def tensors(self):
        out = {"teal.levels": self.levels.astype(np.float32), "teal.thresholds": self.thresholds, "teal.sizes": self.sizes}
        if self.errors is not None:
            out["teal.errors"] = self.errors
        return out

    def values(self):
        return {"teal.tokens": self.tokens, "teal.text": self.text}

    @staticmethod
    def read(values, tensors):
        """The tables stored by tensors() and values(), or None where a file holds none."""
        if "teal.thresholds" not in tensors:
            return None
        return TealTables(tensors["teal.thresholds"], tensors.get("teal.errors"), tensors["teal.sizes"],
                          values["teal.tokens"], values.get("teal.text", ""), tensors["teal.levels"])


def teal_tables(model, ids, errors=True, sample=256, probe_tokens=256, text="", progress=None):
    """TealTables from the inputs seen over token ids (run dense). errors: also each input's output error at each
    level (sample of its inputs against its dequantized matrices), weighed by the model's KL when that input alone
    runs at PROBE in every layer (probe_tokens of ids); without them, the tables serve the uniform allocation only."""
    n_layer, G = model.args.n_layer, len(GROUPS)
    dense_logits, rec = _run(model, np.full((n_layer, G), -1.0), ids, record=True)
    xs = [[np.concatenate(r[g]) for g in range(G)] for r in rec.records]
    ts = np.array([[np.where(LEVELS > 0, np.quantile(np.abs(xs[li][g]), LEVELS), -1.0) for g in range(G)]
                   for li in range(n_layer)])  # one pass over each input for all levels
    sizes = np.array([[_bytes(_group_weights(model, li, g)) for g in range(G)] for li in range(n_layer)])
    if not errors:
        return TealTables(ts, None, sizes, len(ids), text)
    rng = np.random.default_rng(0)
    errs = np.zeros((n_layer, G, len(LEVELS)))
    for li in range(n_layer):
        for g in range(G):
            x = xs[li][g][rng.permutation(len(xs[li][g]))[:sample]]
            errs[li, g] = _errors(np.concatenate([w.dequantize() for w in _group_weights(model, li, g)]), x, LEVELS)
        if progress:
            progress(li + 1, n_layer, f"teal: layer {li + 1}/{n_layer}")
    k = int(np.searchsorted(LEVELS, PROBE))
    probe = ids[:probe_tokens]
    for g in range(G):  # each input alone at PROBE in every layer: its errors in units of the model's KL
        t = np.full((n_layer, G), -1.0)
        t[:, g] = ts[:, g, k]
        kl = _mean_kl(dense_logits[:len(probe)], _run(model, t, probe)[0])
        errs[:, g] *= kl / max(float(errs[:, g, k].mean()), 1e-12)
    return TealTables(ts, errs, sizes, len(ids), text)


def calibrate_teal(model, ids, target, allocation="greedy", sample=256, probe_tokens=256):
    """Thresholds (n_layer, 4) for a target share S of the model's weight bytes (the four inputs' matrices) skipped,
    from the inputs seen over token ids (teal_tables), the share of each input's channels they drop there, and the
    number of tokens. "uniform": every input at S. "greedy": allocate() over every layer and input at once."""
    if not 0.0 <= target < 1.0:
        raise SparserunError(f"teal: the target share must be in [0, 1), got {target}")
    tables = teal_tables(model, ids, allocation != "uniform", sample, probe_tokens)
    t, shares = tables.select(target, allocation)
    return t, shares, len(ids)


def save_teal(path, model, thresholds, tables=None, target=None, allocation=""):
    """A teal file (side_files.TEAL, bound to the model): the thresholds `teal:FILE` runs (None: tables only, the
    cache of tables_for), and the tables when given."""
    tensors = {"thresholds": np.asarray(thresholds, np.float32)} if thresholds is not None else {}
    tensors.update(tables.tensors() if tables is not None else {})
    values = {"target": float(-1 if target is None else target), "allocation": allocation,
              **(tables.values() if tables is not None else {})}
    try:
        TEAL.write(str(path), model.gguf.fingerprint(), values, tensors)
    except OSError as e:
        raise SparserunError(f"{path}: cannot write the teal thresholds: {e.strerror}") from None


def load_teal(path, model):
    """Thresholds (n_layer, 4) from a teal file written by save_teal; refused for another model or another shape."""
    t, _ = TEAL.read(str(path), lambda v, ts: np.asarray(ts["thresholds"], np.float32), model)
    if t.shape != (model.args.n_layer, len(GROUPS)) or not np.all(np.isfinite(t)):
        raise SparserunError(f"{path}: teal thresholds of shape {t.shape}, expected ({model.args.n_layer}, 4) finite")
    return t


def load_tables(path, model, side=TEAL):
    """TealTables from a teal file (side=TEAL) or a profile (side=PROFILE), refused for another model; None when the
    file holds none."""
    tables, _ = side.read(str(path), TealTables.read, model)
    if tables is not None and tables.thresholds.shape[0] != model.args.n_layer:
        raise SparserunError(f"{path}: teal tables of {tables.thresholds.shape[0]} layers, the model has "
                             f"{model.args.n_layer}")
    return tables


def tables_for(model):
    """The tables `teal:S` selects from: the profile beside the model (<model>.profile.gguf) when it holds them,
    else those cached beside the packs, else calibrated now on builtin_text() and cached (said on stderr)."""
    profile = PROFILE.default_path(str(model.path))
    if os.path.exists(profile):
        tables = load_tables(profile, model, PROFILE)
        if tables is not None:
            return tables, f"the profile {profile}"
    path = os.path.join(cache_root(), model.gguf.fingerprint()[:32], "teal.tables.gguf")
    if os.path.exists(path):
        return load_tables(path, model), f"the calibration cached in {path}"
    ids = model.tokenize(builtin_text())[:CALIBRATION_TOKENS]
    print(f"teal: calibrating thresholds on Python's documentation text ({len(ids)} tokens); cached in {path}",
          file=sys.stderr)
    tables = teal_tables(model, ids, text="pydoc_data.topics")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_teal(path, model, None, tables)
    return tables, None


def thresholds_for(model, value):
    """A `teal:` value's (thresholds (n_layer, 4), the share of each input's channels they dropped in calibration or
    None where unknown): a teal file's thresholds, or a target share S selected (greedy) from tables_for(model)."""
    if isinstance(value, str):
        if not os.path.exists(value):
            raise SparserunError(f"{value}: no such teal thresholds file")
        t, tables = load_teal(value, model), load_tables(value, model)
        return t, tables.dropped(t) if tables is not None else None
    tables, source = tables_for(model)
    t, dropped = tables.select(value, "greedy" if tables.errors is not None else "uniform")
    if source is not None:
        print(f"teal:{value:g}: thresholds from {source}", file=sys.stderr)
    return t, dropped
