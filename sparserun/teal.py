"""Input sparsity on every matrix (TEAL-style): a matrix reads only the input channels whose magnitude passes its
threshold, so a skipped channel skips one column of the matrix (its weights across all outputs).

    y = W x  ~  sum over kept j of x_j * W[:, j]        kept: |x_j| > t(layer, input)

Four inputs per layer, each with its own threshold (GROUPS): the attention block's normalized input (read by q, k
and v together), attention's output (read by o), the FFN's normalized input (gate and up together) and the FFN's
hidden activations (down). Thresholds come from calibration (calibrate_teal): the share of the layers' weight bytes
skipped meets the target S, spread over every layer and input greedily by the error each adds to its matrices'
outputs, weighed by how much that input moves the model's output (or uniformly). The first position (BOS: the
attention sink) always runs dense.

Decode tokens (T == 1) of an input whose previous token kept at most COLUMNS_BELOW of its channels read column
packs: the matrices that share the input, stacked and stored column by column (one unit per input channel: its
weights for every output of q|k|v, or gate|up, re-quantized per 32 values in the neuron packs' down formats,
ffn_pack.quantize_columns; a stack is split where that format changes), and the kept channels' units are added by
kernels.sparse.column_axpy (VNNI; elsewhere the neuron packs' pack_ffn in AXPY_ONLY mode). Prompt batches (and
tokens keeping more) run the dense kernels on the input with the dropped channels zeroed: the same selection with
the file's own weights. Column packs are cached beside the neuron packs and loaded into memory at first use.

Composition: `teal:S` alone covers all four inputs; `teal:S+POLICY` (e.g. teal:0.4+threshold:0, teal:0.4+predictor)
covers attention's two and leaves the FFN to POLICY (sparse_ffn.py), whose kernels read the FFN's own packs.
"""
import json
import os
import sys

import numba
import numpy as np
from numba import njit

from .errors import SparserunError
from .ffn_pack import DOWN_KINDS, FOUR_BIT, cache_root, cached_units, part_sums, quantize_columns, unit_stride
from .kernels import ops
from .kernels import quant as K
from .kernels import sparse as S
from .weights import Acts

GROUPS = ("attn_qkv", "attn_o", "ffn_gate_up", "ffn_down")
QKV, O, GATE_UP, DOWN = range(4)
ATTENTION = (QKV, O)
# A decode token keeping more than this share of an input runs the dense kernel on the masked input instead of the
# column pack: the columns stream at 0.75-0.87 of a sequential read and are re-quantized, so near dense they lose
COLUMNS_BELOW = 0.7
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


def _column_kind(weights):
    qtypes = {w.qtype for w in weights}
    return S.DOWN_F32 if qtypes == {K.F32} else S.DOWN_Q4 if qtypes <= set(FOUR_BIT) else S.DOWN_Q8


class ColumnPack:
    """The matrices that read one input, stacked (n_out rows in all) and stored column by column: unit j = input
    channel j's weights for every output, in a neuron-pack down format (f32 exact; q4 for 4-bit sources; int8 else)."""

    def __init__(self, weights, cache_dir, layer, group, first=0):
        self.n_in, self.n_out = weights[0].cols, sum(w.rows for w in weights)
        self.kind = _column_kind(weights)
        used = S.down_bytes.py_func(self.kind, self.n_out)
        self.stride = unit_stride(used)
        self.bounds = np.cumsum([0] + [w.rows for w in weights])  # each matrix's first output, then n_out
        types = "-".join(dict.fromkeys(w.type_name for w in weights))
        stem = f"cols.{layer}.{GROUPS[group]}.{first}.{types}-{DOWN_KINDS[self.kind]}"  # first: its place in the group

        def build():  # (n_in, n_out) float32 -> quantized columns
            return quantize_columns(np.ascontiguousarray(np.concatenate([w.dequantize() for w in weights]).T),
                                    self.kind)

        self.units = cached_units(os.path.join(cache_dir, stem + ".p4.npy"), stem, (self.n_in, self.stride), build)
        self.fused = K.HAS_VNNI and self.kind != S.DOWN_F32  # S.column_axpy's VNNI axpys
        self.n_parts = min(numba.get_num_threads(), self.n_out // K.QK)

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

    def run(self, x, t, idx, coef):
        """(outputs [(1, rows) per matrix], kept) = sum over the channels j with |x[j]| > t of x[j] * column j; idx and
        coef: scratch of x's size (x (n_in,))."""
        out = np.empty((1, self.n_out), np.float32)
        if self.fused:  # selection and axpys in one call
            n = S.column_axpy(self.units, self.stride, self.kind, self.n_out, x, t, idx, coef, self.n_parts, out[0])
        else:  # the neuron packs' kernel: threads split the columns, each into a partial sum
            n = S.select_threshold(x, t, idx)
            coef[:n] = x[idx[:n]]
            S.pack_ffn(self.units, self.stride, 0, 0, K.F32, K.F32, K.HAS_VNNI, self.kind, self.n_out, idx, n, coef,
                       S.AXPY_ONLY, 0, NO_X, part_sums(self.n_out), out[0])
        return [out[:, a:b] for a, b in zip(self.bounds[:-1], self.bounds[1:])], n


class InputSparsity:
    """Per layer and input (GROUPS) a threshold; __call__ runs the matrices of one input under it. thresholds:
    (n_layer, 4), -1 keeps every channel; groups: the inputs covered (the others run dense)."""

    def __init__(self, model, thresholds, groups=range(4)):
        a = model.args
        self.model = model
        self.t = np.asarray(thresholds, np.float32).reshape(a.n_layer, len(GROUPS))
        self.groups = frozenset(groups)
        self.cache_dir = os.path.join(cache_root(), model.gguf.fingerprint()[:32])
        self.packs = {}  # (layer, group) -> [ColumnPack] (None: no column path), built at a decode token's first use
        width = max(a.dim, a.n_ff, a.n_head * a.head_dim)
        self.idx, self.coef = np.empty(width, np.int64), np.empty(width, np.float32)  # the kept channels' scratch
        # the previous token's kept share per layer and input: a decode token reads the columns while it was at most
        # columns_below, else the dense kernel (the same rule as the sparse FFN's DENSE_ABOVE)
        self.last = np.zeros((model.args.n_layer, len(GROUPS)))
        self.columns_below = COLUMNS_BELOW
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
        if T == 1 and not first and self.last[li, group] <= self.columns_below:
            if (li, group) not in self.packs:
                self.packs[li, group] = ColumnPack.for_group(mats.weights, self.cache_dir, li, group)
            packs = self.packs[li, group]
            if packs is not None:
                outs = []
                for pack in packs:
                    o, n = pack.run(x[0], t, self.idx, self.coef)
                    outs += o
                self._count(li, group, (n / n_in,), trace)
                return outs
        xm, counts = np.empty_like(x), np.empty(T, np.int64)  # (T, n_in) the kept channels, the rest zero
        mask_inputs(x, t, first, xm, counts)
        self._count(li, group, counts / n_in, trace)
        return mats(Acts(xm))

    def _count(self, li, group, shares, trace):
        self.kept[li, group] += sum(shares)
        self.tokens[li, group] += len(shares)
        self.last[li, group] = shares[-1]
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
PROBE = 0.5  # the least level each input is probed at alone, end to end, to weigh its errors (calibrate_teal)


def _errors(w, x, levels):
    """Relative output error of dropping each level's share of the smallest |x| entries (one threshold for all rows
    of x, as at run time): ||(x * dropped) W^T||^2 / ||x W^T||^2 per level."""
    score = np.abs(x)
    ts = np.quantile(score, levels)
    ref = float(np.sum((x @ w.T) ** 2)) or 1.0
    return np.array([float(np.sum(((x * (score <= t)) @ w.T) ** 2)) / ref if s > 0 else 0.0
                     for s, t in zip(levels, ts)])


def allocate(errors, sizes, target):
    """Greedy: levels (indices into LEVELS), one per input, whose byte-weighted mean share reaches target, each step
    taken where the error added per byte skipped is least. errors: per input, the error at each level (convex
    enough in practice: a step is judged by its own increment)."""
    at = np.zeros(len(errors), np.int64)
    sizes = np.asarray(sizes, float)
    need = target * sizes.sum() - 1e-9
    done = 0.0
    while done < need:
        nxt = np.minimum(at + 1, len(LEVELS) - 1)
        gain = sizes * (LEVELS[nxt] - LEVELS[at])
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
    InputSparsity (recording its inputs when asked)."""
    inputs = InputSparsity(model, thresholds)
    if record:
        inputs.record()
    saved = model.use_ffn(TealFFN(model, None, inputs))
    try:
        logits = model.logits(ids)
    finally:
        model.use_ffn(saved)
        model.reset()
    return logits, inputs


def calibrate_teal(model, ids, target, allocation="greedy", sample=256, probe_tokens=256):
    """Thresholds (n_layer, 4) for a target share S of the model's weight bytes (the four inputs' matrices) skipped,
    from the inputs seen over token ids (run dense), and the share of each input's channels they drop there.
    "uniform": every input at S. "greedy": each input's relative output error at each level (_errors), weighed by
    how much the model's output moves when that input alone runs at PROBE in every layer (mean KL over probe_tokens
    against dense, per unit of its mean error there), then allocate() over every layer and input at once."""
    if not 0.0 <= target < 1.0:
        raise SparserunError(f"teal: the target share must be in [0, 1), got {target}")
    if allocation not in ("greedy", "uniform"):
        raise SparserunError(f"teal: allocation must be greedy or uniform, got {allocation!r}")
    n_layer, G = model.args.n_layer, len(GROUPS)
    dense_logits, rec = _run(model, np.full((n_layer, G), -1.0), ids, record=True)
    xs = [[np.concatenate(r[g]) for g in range(G)] for r in rec.records]
    quantile = lambda li, g, s: float(np.quantile(np.abs(xs[li][g]), s)) if s > 0 else -1.0  # noqa: E731
    if allocation == "uniform":
        t = np.array([[quantile(li, g, target) for g in range(G)] for li in range(n_layer)], np.float32)
        return t, np.full((n_layer, G), target), len(ids)
    rng = np.random.default_rng(0)
    errs = np.zeros((n_layer, G, len(LEVELS)))
    ts = np.zeros((n_layer, G, len(LEVELS)))
    sizes = np.zeros((n_layer, G))
    for li in range(n_layer):
        for g in range(G):
            mats = _group_weights(model, li, g)
            x = xs[li][g][rng.permutation(len(xs[li][g]))[:sample]]
            errs[li, g] = _errors(np.concatenate([w.dequantize() for w in mats]), x, LEVELS)
            ts[li, g] = np.where(LEVELS > 0, np.quantile(np.abs(xs[li][g]), LEVELS), -1.0)  # one pass for all
            sizes[li, g] = _bytes(mats)
    k = int(np.searchsorted(LEVELS, max(PROBE, target)))
    probe = ids[:probe_tokens]
    weight = np.ones(G)
    for g in range(G):  # each input alone at PROBE in every layer: its errors in units of the model's KL
        t = np.full((n_layer, G), -1.0)
        t[:, g] = ts[:, g, k]
        kl = _mean_kl(dense_logits[:len(probe)], _run(model, t, probe)[0])
        weight[g] = kl / max(float(errs[:, g, k].mean()), 1e-12)
    at = allocate(list((errs * weight[None, :, None]).reshape(n_layer * G, -1)), sizes.ravel(), target)
    at = at.reshape(n_layer, G)
    t = np.where(at > 0, np.take_along_axis(ts, at[..., None], 2)[..., 0], -1.0).astype(np.float32)
    return t, LEVELS[at], len(ids)


def save_teal(path, model, thresholds, **facts):
    try:
        with open(path, "w") as fh:
            json.dump({"teal": 1, "model_fingerprint": model.gguf.fingerprint(), "groups": list(GROUPS),
                       "thresholds": np.asarray(thresholds, np.float32).astype(float).tolist(), **facts}, fh, indent=1)
    except OSError as e:
        raise SparserunError(f"{path}: cannot write the teal thresholds: {e.strerror}") from None


def load_teal(path, model):
    """Thresholds (n_layer, 4) from a file written by save_teal; refused for another model or another shape."""
    try:
        with open(path) as fh:
            data = json.load(fh)
        t = np.asarray(data["thresholds"], np.float32)
        fp = data["model_fingerprint"]
    except OSError as e:
        raise SparserunError(f"{path}: cannot read the teal thresholds ({e.strerror})") from None
    except (ValueError, KeyError, TypeError) as e:
        raise SparserunError(f"{path}: not a teal thresholds file ({e})") from None
    if fp != model.gguf.fingerprint():
        raise SparserunError(f"{path}: teal thresholds of another model (fingerprint {str(fp)[:16]}..., this model's "
                             f"is {model.gguf.fingerprint()[:16]}...)")
    if t.shape != (model.args.n_layer, len(GROUPS)) or not np.all(np.isfinite(t)):
        raise SparserunError(f"{path}: teal thresholds of shape {t.shape}, expected ({model.args.n_layer}, 4) finite")
    return t


def thresholds_for(model, value):
    """A `teal:` value: a thresholds file, or a target share S, calibrated (greedy) on builtin_text() at first use and
    cached beside the model's packs."""
    if isinstance(value, str):
        if not os.path.exists(value):
            raise SparserunError(f"{value}: no such teal thresholds file")
        return load_teal(value, model)
    path = os.path.join(cache_root(), model.gguf.fingerprint()[:32], f"teal.{value:g}.json")
    if os.path.exists(path):
        return load_teal(path, model)
    ids = model.tokenize(builtin_text())[:CALIBRATION_TOKENS]
    print(f"teal:{value:g}: calibrating thresholds on Python's documentation text ({len(ids)} tokens); cached in "
          f"{path}", file=sys.stderr)
    t, shares, n = calibrate_teal(model, ids, value)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_teal(path, model, t, target=value, allocation="greedy", tokens=n, text="pydoc_data.topics",
              shares=shares.round(3).tolist())
    return t
