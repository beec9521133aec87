"""Watch a model's FFN activations over a text: the one mechanism behind calibration, profiling and
predictor training. The dense model runs over the token ids (fresh context per batch); for every layer
and batch, on_layer(layer, x, mag) receives the FFN input x (T, dim) and |activation| mag (T, n_ff):
|act(gate)| for gated FFNs, |act(up)| otherwise (what the threshold policy and predictors select on).
"""
import numpy as np

from .kernels import ops


def watch_ffn(model, ids, on_layer, batch=256, progress=None):
    import time

    def observe(li, acts):
        L = model.layers[li]
        pre = (L.w_gate if L.w_gate is not None else L.w_up).matmul(acts)
        a = np.empty_like(pre)
        ops.ffn_activate(pre[:0], pre, model.act_id, a)
        on_layer(li, acts.x, np.abs(a))

    t0 = time.perf_counter()
    with model.observing_ffn(observe):
        for s in range(0, len(ids), batch):
            model.reset()
            model.eval(ids[s:s + batch])
            if progress:
                done = min(len(ids), s + batch)
                progress(done, len(ids), f"{done}/{len(ids)} tokens, {done / (time.perf_counter() - t0):.0f} tok/s")
