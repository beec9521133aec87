"""Run-time side of the predictor policy (`--sparsity predictor[:FILE]`, sparsity.Predicted): evaluates each layer's
low-rank predictor on the FFN input with a numba kernel and hands the predicted neuron ids to the
sparse FFN, which then computes gate, up and down for those neurons alone. Its own time is summed in
`seconds` so its cost per token can be reported."""
import time

import numba
import numpy as np

from .kernels import sparse as S
from .side_files import PREDICTORS


class Predictor:
    """Weights held as int8 with a float32 scale per output row (predictors.lowrank.round_to_int8: files
    written by train-predictors are already on that grid, so this is exact for them)."""

    def __init__(self, pset):
        from predictors.lowrank import int8_rows

        self.layers = []
        for p in pset.layers:
            q1, s1 = int8_rows(np.ascontiguousarray(p.w1.T, np.float32))  # (r, dim)
            q2, s2 = int8_rows(np.ascontiguousarray(p.w2.T, np.float32))  # (n_ff, r)
            q2 = np.ascontiguousarray(q2.T)  # (r, n_ff) and scales (1, n_ff): the kernel's layout
            self.layers.append((q1, s1, p.b1.astype(np.float32), q2, s2.reshape(1, -1), p.b2.astype(np.float32),
                                np.float32(p.threshold)))
        self.idx = np.empty(self.layers[0][3].shape[1], np.int64)
        self.residual = pset.input == "residual"  # PowerInfer's form reads the residual stream
        self.seconds = 0.0

    def __call__(self, li, acts):
        x = acts.residual if self.residual else acts.x
        t0 = time.perf_counter()
        q1, s1, b1, q2, s2, b2, t = self.layers[li]
        out = []
        for row in x:
            n = S.predict_active_i8(np.ascontiguousarray(row, np.float32), q1, s1, b1, q2, s2, b2, t, self.idx,
                                    2 * numba.get_num_threads())
            out.append(self.idx[:n].copy())
        self.seconds += time.perf_counter() - t0
        return out


def load_predictor(model, path=None):
    """The predictor of FILE, or of the model's default predictor file (side_files.PREDICTORS)."""
    from predictors.format import load_predictors

    return Predictor(load_predictors(path or PREDICTORS.default_path(model.path), model))
