"""Sampling as pure functions on a logits vector, in llama.cpp's default order:
repeat penalty -> top-k -> top-p -> min-p -> temperature -> draw. temperature <= 0 is greedy."""
from dataclasses import dataclass, fields

import numpy as np

from .errors import SparserunError


@dataclass
class SamplingParams:
    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    seed: int | None = None

    def validate(self):
        checks = [(self.top_k >= 0, "top_k must be >= 0 (0 disables it)"),
                  (0.0 < self.top_p <= 1.0, "top_p must be in (0, 1]"),
                  (0.0 <= self.min_p < 1.0, "min_p must be in [0, 1)"),
                  (self.repeat_penalty > 0.0, "repeat_penalty must be > 0"),
                  (self.repeat_last_n >= 0, "repeat_last_n must be >= 0"),
                  (self.temperature >= 0.0, "temperature must be >= 0")]
        for ok, msg in checks:
            if not ok:
                raise SparserunError(f"invalid sampling parameter: {msg}")
        return self

    @classmethod
    def names(cls):
        return [f.name for f in fields(cls)]


def apply_repeat_penalty(logits, recent, penalty):
    """llama.cpp's penalty: a recent token's positive logit is divided by it, a negative one multiplied."""
    if penalty == 1.0 or len(recent) == 0:
        return logits
    out = logits.copy()
    idx = np.unique(np.asarray(recent, np.int64))
    v = out[idx]
    out[idx] = np.where(v > 0, v / penalty, v * penalty)
    return out


def softmax(logits):
    z = logits.astype(np.float64) - np.max(logits)
    e = np.exp(z)
    return e / e.sum()


def candidates(logits, top_k=0, top_p=1.0, min_p=0.0):
    """Token ids kept by top-k, top-p and min-p, most probable first."""
    order = np.argsort(-logits, kind="stable")
    if top_k > 0:
        order = order[:top_k]
    p = softmax(logits[order])
    if top_p < 1.0:
        keep = int(np.searchsorted(np.cumsum(p), top_p) + 1)  # smallest prefix with mass >= top_p
        order, p = order[:keep], p[:keep]
    if min_p > 0.0:
        order = order[p >= min_p * p[0]]
    return order


def sample(logits, params, rng, recent=()):
    """One token id from logits (n_vocab,) under params; rng is a numpy Generator."""
    logits = apply_repeat_penalty(np.asarray(logits, np.float32), recent[-params.repeat_last_n:] if params.repeat_last_n else (), params.repeat_penalty)
    if params.temperature <= 0.0:
        return int(np.argmax(logits))
    keep = candidates(logits, params.top_k, params.top_p, params.min_p)
    p = softmax(logits[keep] / params.temperature)
    return int(keep[rng.choice(len(keep), p=p)])
