"""Sparsity policies: which FFN neurons a token computes. Parsed from `--sparsity SPEC`:

    dense                      every neuron (the reference)
    topk:K                     the K largest |activation| neurons per token; K a count (128) or a
                               fraction (0.1); one value, or one per layer separated by commas
    threshold:T                neurons with |activation| > T; one value, one per layer, or a
                               file: threshold:thresholds.json ({"thresholds": [t0, t1, ...]})
    predictor[:FILE]           neurons an activation predictor (sparserun train-predictors) calls
                               active; FILE defaults to <model>.predictors.gguf beside the model

For SwiGLU models activations are act(gate) (CATS: gate computed densely, then up and down for the
kept neurons only); ReLU-family models also skip their natural zeros in every sparse mode.
A policy can instead be handed a predicted neuron set per layer (the predictor policy, predictor_policy.py):
then gate, up and down are all computed for those neurons alone.
"""
import json
import os
from dataclasses import dataclass

import numpy as np

from .errors import SparserunError

KINDS = ("dense", "topk", "threshold", "predictor")


@dataclass
class SparsityPolicy:
    kind: str = "dense"
    values: tuple = ()  # per layer: k (int count or float fraction) for topk, threshold for threshold
    spec: str = "dense"

    @property
    def is_dense(self):
        return self.kind == "dense"

    def per_layer(self, n_layer):
        if len(self.values) == 1:
            return list(self.values) * n_layer
        if len(self.values) != n_layer:
            raise SparserunError(f"--sparsity {self.spec}: {len(self.values)} values for a model of {n_layer} layers "
                                 "(give one value, or one per layer)")
        return list(self.values)

    def topk_counts(self, n_layer, n_ff):
        """k per layer as a neuron count."""
        return [max(1, min(n_ff, int(round(v * n_ff)) if isinstance(v, float) else v)) for v in self.per_layer(n_layer)]


def _number(text, spec):
    try:
        return int(text) if text.strip().lstrip("+").isdigit() else float(text)
    except ValueError:
        raise SparserunError(f"--sparsity {spec}: {text!r} is not a number") from None


def parse_sparsity(spec):
    """A SparsityPolicy from a spec string (see the module doc); a clear error for anything else."""
    if isinstance(spec, SparsityPolicy):
        return spec
    spec = (spec or "dense").strip()
    kind, _, arg = spec.partition(":")
    kind = kind.lower()
    if kind not in KINDS:
        raise SparserunError(f"--sparsity {spec}: unknown policy {kind!r} (choose from dense, topk:K, threshold:T|FILE, "
                             "predictor[:FILE])")
    if kind == "dense":
        if arg:
            raise SparserunError(f"--sparsity {spec}: dense takes no value")
        return SparsityPolicy("dense", (), spec)
    if kind == "predictor":
        return SparsityPolicy("predictor", (arg,) if arg else (), spec)
    if not arg:
        raise SparserunError(f"--sparsity {spec}: {kind} needs a value, e.g. {kind}:{'0.1' if kind == 'topk' else '0.05'}")
    if kind == "threshold" and not _looks_numeric(arg):
        values = tuple(load_thresholds(arg))
    else:
        values = tuple(_number(x, spec) for x in arg.split(","))
    for v in values:
        if kind == "topk" and (v <= 0 or (isinstance(v, float) and v > 1.0)):
            raise SparserunError(f"--sparsity {spec}: k must be a count >= 1 or a fraction in (0, 1], got {v}")
        if kind == "threshold" and (v < 0 or not np.isfinite(v)):
            raise SparserunError(f"--sparsity {spec}: thresholds must be finite and >= 0, got {v}")
    return SparsityPolicy(kind, values, spec)


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
