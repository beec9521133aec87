"""Watch a model's FFN activations over a text: the one mechanism behind calibration, profiling and
predictor training. The dense model runs over the token ids (fresh context per batch); for every layer
and batch, on_layer(layer, x, mag) receives the FFN input x (T, dim) and |activation| mag (T, n_ff):
|act(gate)| for gated FFNs, |act(up)| otherwise (what the threshold policy and predictors select on).
"""
import numpy as np

from .kernels import ops


class _HeadRecorder:
    """A dense head that also hands each batch's head inputs and greedy tokens to on_head(x (T, dim), argmax (T,))."""

    def __init__(self, model, on_head):
        self.model, self.on_head = model, on_head

    def __call__(self, acts, prior=(), ids=()):
        logits = self.model.output.matmul(acts)
        self.on_head(acts.x, logits.argmax(1))
        return logits


def watch_ffn(model, ids, on_layer, batch=256, progress=None, on_head=None, residual=False):
    """on_layer (None: no FFN observer): called per layer and batch with the FFN input and its activations' magnitudes.
    on_head: also called per batch with the output head's inputs (T, dim) and the dense model's greedy tokens.
    residual: on_layer receives the residual stream the FFN input was normalized from instead (PowerInfer's
    predictors read that)."""
    import time

    def observe(li, acts):
        L = model.layers[li]
        pre = (L.w_gate if L.w_gate is not None else L.w_up).matmul(acts)
        a = np.empty_like(pre)
        ops.ffn_activate(pre[:0], pre, model.act_id, a)
        on_layer(li, acts.residual if residual else acts.x, np.abs(a))

    import contextlib

    t0 = time.perf_counter()
    old_head = model.use_head(_HeadRecorder(model, on_head) if on_head else model.head)
    try:
        with model.observing_ffn(observe) if on_layer else contextlib.nullcontext():
            for s in range(0, len(ids), batch):
                model.reset()
                model.eval(ids[s:s + batch], all_logits=on_head is not None)
                if progress:
                    done = min(len(ids), s + batch)
                    progress(done, len(ids), f"{done}/{len(ids)} tokens, {done / (time.perf_counter() - t0):.0f} tok/s")
    finally:
        model.use_head(old_head)
