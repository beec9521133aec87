"""Sparsity policies: which FFN neurons a token computes. Parsed from `--sparsity SPEC`:

    dense                      every neuron (the reference)
    topk:K                     the K largest |activation| neurons per token; K a count (128) or a
                               fraction (0.1); one value, or one per layer separated by commas
    threshold:T                neurons with |activation| > T; one value, one per layer, or a
                               file: threshold:thresholds.json ({"thresholds": [t0, t1, ...]})
    predictor[:FILE]           neurons an activation predictor (sparserun train-predictors) calls
                               active; FILE defaults to <model>.gguf.predictors.gguf beside the model;
                               a PowerInfer (PWRI) model's own predictors by default, predictor:T
                               runs them at threshold T instead of the file's
    teal:S | teal:FILE         input sparsity on every matrix (teal.py): per layer and input, channels
                               under a calibrated threshold skipped, S the share of weight bytes
                               skipped, selected from the calibration in <model>.gguf.profile.gguf
                               (sparserun profile) or else calibrated at first use on a built-in
                               text and cached; or a thresholds file (sparserun calibrate --teal)
    teal:S+POLICY              teal on attention's inputs, POLICY (any of the above) on the FFN

For SwiGLU models activations are act(gate) (CATS: gate computed densely, then up and down for the
kept neurons only); ReLU-family models also skip their natural zeros in every sparse mode. A predictor
policy hands the FFN a predicted neuron set per layer instead: then gate, up and down are all computed
for those neurons alone.

Each policy is a class that owns its selection: the sparse FFN (sparse_ffn.py) and the hybrid (hybrid.py)
ask it, never test which policy it is. A new policy is a subclass registered in POLICIES.
"""
import json
import os

import numpy as np

from .errors import SparserunError
from .kernels import sparse as S


class Policy:
    """The dense policy, and the interface of every policy. `values`: the spec's numbers, one or one per layer."""

    name = "dense"
    is_dense = True  # computes every neuron: the model runs without a sparse FFN
    fused_decode = False  # decode tokens may run selection and pack in one kernel (select_pack_ffn)
    gate_dense = True  # the gate rows are read densely to select (placement counts them as always read)
    teal = None  # input sparsity (teal.py) with it: a target share (float) or a thresholds file (str)

    def __init__(self, values=(), spec=None):
        self.values = tuple(values)
        self.spec = spec or self.name

    def __repr__(self):
        return f"{type(self).__name__}({self.spec!r})"

    def per_layer(self, n_layer):
        if len(self.values) == 1:
            return list(self.values) * n_layer
        if len(self.values) != n_layer:
            raise SparserunError(f"--sparsity {self.spec}: {len(self.values)} values for a model of {n_layer} layers "
                                 "(give one value, or one per layer)")
        return list(self.values)

    def layer_params(self, n_layer, n_ff):
        """What select() needs per layer (a count, a threshold), resolved once for a model's shape."""
        return [None] * n_layer

    def select(self, a, param, idx):
        """Kept neuron ids of one token's activations a (n,) into idx; returns how many."""
        idx[:len(a)] = np.arange(len(a))
        return len(a)

    def mask_args(self, param):
        """(k, t) for kernels.sparse.activate_masked (a prompt batch's selection), or None: keep every neuron."""
        return None

    def device_threshold(self, param):
        """The keep rule of the GPU's share of a layer (hybrid.py): |a| > t, -1 keeps every neuron."""
        return -1.0

    def predictor(self, model):
        """A callable (layer, acts: the FFN's weights.Acts of T tokens) -> list of T id arrays when the policy predicts
        its neuron sets."""
        return None


class TopK(Policy):
    name, is_dense = "topk", False

    def check(self):
        for v in self.values:
            if v <= 0 or (isinstance(v, float) and v > 1.0):
                raise SparserunError(f"--sparsity {self.spec}: k must be a count >= 1 or a fraction in (0, 1], got {v}")

    def layer_params(self, n_layer, n_ff):
        return [max(1, min(n_ff, int(round(v * n_ff)) if isinstance(v, float) else v)) for v in self.per_layer(n_layer)]

    def select(self, a, k, idx):
        return S.select_topk(a, k, idx)

    def mask_args(self, k):
        return k, np.float32(0.0)

    def device_threshold(self, k):
        raise SparserunError("--sparsity topk ranks all of a layer's neurons together, so it cannot be split "
                             "between CPU and GPU: use threshold:... or predictor with --device cuda")


class Threshold(Policy):
    name, is_dense, fused_decode = "threshold", False, True

    def check(self):
        for v in self.values:
            if v < 0 or not np.isfinite(v):
                raise SparserunError(f"--sparsity {self.spec}: thresholds must be finite and >= 0, got {v}")

    def layer_params(self, n_layer, n_ff):
        return [np.float32(t) for t in self.per_layer(n_layer)]

    def select(self, a, t, idx):
        return S.select_threshold(a, t, idx)

    def mask_args(self, t):
        return 0, np.float32(t)

    def device_threshold(self, t):
        return float(t)


class Predicted(Policy):
    """Neuron sets from trained predictors; values: (FILE,), (THRESHOLD,) or (). A PowerInfer (PWRI) model's own
    predictors run by default, at the file's threshold or THRESHOLD (powerinfer.py); otherwise FILE, or the model's
    default predictor file, from `sparserun train-predictors` (predictor.py)."""

    name, is_dense, gate_dense = "predictor", False, False

    def predictor(self, model):
        from . import powerinfer
        from .predictor import load_predictor

        arg = self.values[0] if self.values else None
        if isinstance(arg, float) or (arg is None and powerinfer.has_predictors(model.gguf)):
            return powerinfer.PowerInferPredictor(model, arg)
        return load_predictor(model, arg)


POLICIES = {p.name: p for p in (Policy, TopK, Threshold, Predicted)}


def _number(text, spec):
    try:
        return int(text) if text.strip().lstrip("+").isdigit() else float(text)
    except ValueError:
        raise SparserunError(f"--sparsity {spec}: {text!r} is not a number") from None


def parse_sparsity(spec):
    """A Policy from a spec string (see the module doc); a clear error for anything else. `teal:...` parts give the
    policy its `teal`; the rest is the FFN's policy (dense when there is none)."""
    if isinstance(spec, Policy):
        return spec
    spec = (spec or "dense").strip()
    parts = [p.strip() for p in spec.split("+")]
    teal = [p for p in parts if p.lower().startswith("teal")]
    if not teal:
        return _parse_one(spec)
    if len(teal) > 1 or len(parts) > 2:
        raise SparserunError(f"--sparsity {spec}: give at most one teal part and one FFN policy, e.g. "
                             "teal:0.4+threshold:0")
    rest = [p for p in parts if p not in teal]
    policy = _parse_one(rest[0]) if rest else Policy()
    policy.teal, policy.spec = _teal_value(teal[0], spec), spec
    return policy


def _teal_value(part, spec):
    name, _, arg = part.partition(":")
    if name.lower() != "teal" or not arg:
        raise SparserunError(f"--sparsity {spec}: teal needs a target share or a thresholds file, e.g. teal:0.4")
    if not _looks_numeric(arg):
        return arg
    value = float(arg)
    if not 0.0 <= value < 1.0:
        raise SparserunError(f"--sparsity {spec}: the teal share must be in [0, 1), got {value}")
    return value


def _parse_one(spec):
    name, _, arg = spec.partition(":")
    cls = POLICIES.get(name.lower())
    if cls is None:
        raise SparserunError(f"--sparsity {spec}: unknown policy {name.lower()!r} (choose from dense, topk:K, "
                             "threshold:T|FILE, predictor[:FILE], teal:S|FILE)")
    if cls is Policy:
        if arg:
            raise SparserunError(f"--sparsity {spec}: dense takes no value")
        return Policy(spec=spec)
    if cls is Predicted:  # a number is a PowerInfer model's threshold, anything else a predictor file
        value = float(arg) if arg and _looks_numeric(arg) and "," not in arg else arg
        return Predicted((value,) if arg else (), spec)
    if not arg:
        raise SparserunError(f"--sparsity {spec}: {cls.name} needs a value, e.g. "
                             f"{cls.name}:{'0.1' if cls is TopK else '0.05'}")
    if cls is Threshold and not _looks_numeric(arg):
        values = tuple(load_thresholds(arg))
    else:
        values = tuple(_number(x, spec) for x in arg.split(","))
    policy = cls(values, spec)
    policy.check()
    return policy


def _looks_numeric(arg):
    try:
        [float(x) for x in arg.split(",")]
        return True
    except ValueError:
        return False


def load_thresholds(path):
    """Per-layer thresholds from a JSON file {"thresholds": [...]} (written by calibration)."""
    if not os.path.exists(path):
        raise SparserunError(f"{path}: no such thresholds file")
    try:
        with open(path) as fh:
            data = json.load(fh)
        values = [float(x) for x in data["thresholds"]]
    except (ValueError, KeyError, TypeError) as e:
        raise SparserunError(f"{path}: not a thresholds file (expected JSON {{\"thresholds\": [...]}}: {e})") from None
    if not values:
        raise SparserunError(f"{path}: empty thresholds list")
    return values


def save_thresholds(path, thresholds, **extra):
    with open(path, "w") as fh:
        json.dump({"thresholds": [float(t) for t in thresholds], **extra}, fh, indent=1)
