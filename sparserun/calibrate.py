"""Per-layer thresholds for a target FFN sparsity (CATS / TEAL style).

Runs the dense model over calibration tokens, records each layer's activation magnitudes (|act(gate)|
for gated FFNs, |act(up)| otherwise: what the threshold policy compares), and takes the quantile that
leaves `sparsity` of them below the threshold. For ReLU models the natural zeros count toward the
sparsity, so a target below the natural sparsity gives a threshold of 0.
"""
import numpy as np

from .activations import watch_ffn


def activation_magnitudes(model, ids, batch=256):
    """Per layer, |activation| of every calibration token: list of (n_tokens, n_ff) float32."""
    records = [[] for _ in model.layers]
    watch_ffn(model, ids, lambda li, x, mag: records[li].append(mag), batch)
    return [np.concatenate(r) for r in records]


def calibrate_thresholds(model, ids, sparsity):
    """Thresholds (one per layer) under which `sparsity` of the activation magnitudes fall."""
    if not 0.0 <= sparsity < 1.0:
        from .errors import SparserunError

        raise SparserunError(f"target sparsity must be in [0, 1), got {sparsity}")
    return [float(np.quantile(m, sparsity)) for m in activation_magnitudes(model, ids)]
