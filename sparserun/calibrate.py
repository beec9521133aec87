"""Per-layer thresholds for a target FFN sparsity (CATS / TEAL style).

Runs the dense model over calibration tokens, records each layer's activation magnitudes (|act(gate)|
for gated FFNs, |act(up)| otherwise: what the threshold policy compares), and takes the quantile that
leaves `sparsity` of them below the threshold. For ReLU models the natural zeros count toward the
sparsity, so a target below the natural sparsity gives a threshold of 0.
"""
import numpy as np

from .kernels import ops


def activation_magnitudes(model, ids, batch=256):
    """Per layer, |activation| of every calibration token: list of (n_tokens, n_ff) float32."""
    records = [[] for _ in model.layers]
    original = model.ffn

    def recording_ffn(li, acts):
        L = model.layers[li]
        pre = (L.w_gate if L.w_gate is not None else L.w_up).matmul(acts)
        a = np.empty_like(pre)
        ops.ffn_activate(pre[:0], pre, model.act_id, a)
        records[li].append(np.abs(a))
        return original(li, acts)

    sparse, model.sparse = model.sparse, None
    model.ffn = recording_ffn
    try:
        for s in range(0, len(ids), batch):
            model.reset()
            model.eval(ids[s:s + batch], all_logits=False)
    finally:
        model.ffn, model.sparse = original, sparse
        model.reset()
    return [np.concatenate(r) for r in records]


def calibrate_thresholds(model, ids, sparsity):
    """Thresholds (one per layer) under which `sparsity` of the activation magnitudes fall."""
    if not 0.0 <= sparsity < 1.0:
        from .errors import SparserunError

        raise SparserunError(f"target sparsity must be in [0, 1), got {sparsity}")
    return [float(np.quantile(m, sparsity)) for m in activation_magnitudes(model, ids)]
