"""The predictor file: a GGUF side file (sparserun/side_files.py) with architecture "sparserun-predictors".

Keys: sparserun.predictors.{model_fingerprint, target_recall, input} (input: "ffn", the FFN's normalized input, or
"residual", the residual stream before ffn_norm, as PowerInfer's predictors read it; absent means ffn). Tensors (float32): decision_thresholds
(n_layer), label_thresholds (n_layer: what "active" meant in training, 0 = non-zero), and per layer
blk.N.w1 (dim x r, stored as r rows of dim), blk.N.b1 (r), blk.N.w2 (r x n_ff, stored as n_ff rows of
r), blk.N.b2 (n_ff). Both matrices are stored row-per-output so the runtime kernels are row dots.
"""
from dataclasses import dataclass

import numpy as np

from sparserun.errors import SparserunError
from sparserun.side_files import PREDICTORS

from .lowrank import LayerPredictor


@dataclass
class PredictorSet:
    fingerprint: str
    layers: list  # LayerPredictor per layer
    label_thresholds: np.ndarray
    target_recall: float
    input: str = "ffn"  # what the predictors read: "ffn" (the FFN's normalized input) or "residual" (PowerInfer's form)

    def save(self, path):
        tensors = {"decision_thresholds": np.array([p.threshold for p in self.layers], np.float32),
                   "label_thresholds": self.label_thresholds}
        for i, p in enumerate(self.layers):  # both matrices row-per-output: the runtime kernels are row dots
            tensors.update({f"blk.{i}.w1": p.w1.T, f"blk.{i}.b1": p.b1, f"blk.{i}.w2": p.w2.T, f"blk.{i}.b2": p.b2})
        PREDICTORS.write(path, self.fingerprint, {"target_recall": float(self.target_recall), "input": self.input},
                         tensors)


def load_predictors(path, model=None):
    """Read a predictor file; with `model`, refuse one made for another model or of the wrong shape."""
    def build(v, t):
        thr = t["decision_thresholds"].reshape(-1)
        layers = [LayerPredictor(np.ascontiguousarray(t[f"blk.{i}.w1"].T), t[f"blk.{i}.b1"].reshape(-1),
                                 np.ascontiguousarray(t[f"blk.{i}.w2"].T), t[f"blk.{i}.b2"].reshape(-1), float(thr[i]))
                  for i in range(len(thr))]
        return layers, t["label_thresholds"].reshape(-1), float(v["target_recall"]), str(v.get("input", "ffn"))

    (layers, labels, recall, source), fingerprint = PREDICTORS.read(path, build, model)
    if model is not None:
        a = model.args
        if len(layers) != a.n_layer or any(p.w1.shape[0] != a.dim or p.w2.shape[1] != a.n_ff for p in layers):
            raise SparserunError(f"{path}: predictor shapes do not match {model.path}")
    if source not in ("ffn", "residual"):
        raise SparserunError(f"{path}: predictor input {source!r} is neither ffn nor residual")
    return PredictorSet(fingerprint, layers, labels, recall, source)
