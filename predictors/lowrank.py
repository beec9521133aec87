"""Low-rank MLP activation predictors: x (dim) -> relu(x W1 + b1) (r) -> W2 + b2 (n_ff) logits; neuron i
is predicted active when logit_i > threshold. Trained with numpy (Adam, class-balanced logistic loss), from
a reduced-rank-regression start when the FFN's pre-activations are known (`rrr_init`).
"""
from dataclasses import dataclass

import numpy as np


@dataclass
class LayerPredictor:
    w1: np.ndarray  # (dim, r) float32
    b1: np.ndarray  # (r,)
    w2: np.ndarray  # (r, n_ff)
    b2: np.ndarray  # (n_ff,)
    threshold: float  # decision threshold on the logits

    @property
    def rank(self):
        return self.w1.shape[1]

    @property
    def n_params(self):
        return self.w1.size + self.b1.size + self.w2.size + self.b2.size

    def logits(self, x):
        return np.maximum(x @ self.w1 + self.b1, 0.0) @ self.w2 + self.b2

    def predict(self, x):
        """(T, dim) -> (T, n_ff) bool."""
        return self.logits(x) > self.threshold


def rrr_init(x, g, w, rank):
    """A rank-`rank` predictor whose logits approximate the pre-activations g = x W^T (N, n_ff) of the layer
    whose activity is predicted (its gate, or up without a gate; w: that matrix, (n_ff, dim)).

    Reduced-rank regression with the true map known: minimise ||x W^T - x V U||_F over V (dim, r), U (r, n_ff).
    The fitted values x W^T are g itself, so the optimum projects W onto the top-r right singular vectors P of
    the centred g (the directions in neuron space the data actually excites): U = P^T, V = W^T P. A bias c
    shifts the hidden units so relu() is the identity on the data's range, which makes the MLP exactly the
    linear map x -> (x V) U + intercept on the training inputs."""
    gm = g.mean(0)
    _, _, vt = np.linalg.svd(g - gm, full_matrices=False)
    P = vt[:rank].T.astype(np.float32)  # (n_ff, r)
    V = (w.T @ P).astype(np.float32)  # (dim, r)
    h = x @ V  # (N, r)
    c = (np.maximum(0.0, -h.min(0)) + 3.0 * h.std(0) + 1e-3).astype(np.float32)  # relu(h + c) = h + c on the data
    U = P.T  # (r, n_ff)
    b2 = (gm - (h.mean(0) + c) @ U).astype(np.float32)  # so that relu(h + c) U + b2 = h U + (gm - mean(h) U)
    return LayerPredictor(V, c, np.ascontiguousarray(U), b2, 0.0)


def bias_free_init(xr, w_eff, rank):
    """PowerInfer's form of rrr_init: a predictor without biases, on the residual input xr (N, dim) of a layer whose
    gate reads rmsnorm(xr) * w_norm, i.e. w_eff = W diag(w_norm) (n_ff, dim) applied to xr and divided by rms(xr). The
    division only scales, so the sign of each pre-activation is the sign of xr w_eff^T, a linear map: reduced-rank
    regression onto it (no centring: there is no intercept to absorb it) gives V (dim, r), U (r, n_ff), and
    w1 = [V, -V], w2 = [U; -U] make relu(x w1) w2 = x V U exactly (relu(z) - relu(-z) = z). Hidden size 2r."""
    g = xr @ w_eff.T  # (N, n_ff): the pre-activations times rms(xr)
    _, _, vt = np.linalg.svd(g, full_matrices=False)
    P = vt[:rank].T.astype(np.float32)  # (n_ff, r)
    V = (w_eff.T @ P).astype(np.float32)  # (dim, r)
    r2 = 2 * V.shape[1]
    return LayerPredictor(np.hstack([V, -V]), np.zeros(r2, np.float32), np.ascontiguousarray(np.vstack([P.T, -P.T])),
                          np.zeros(g.shape[1], np.float32), 0.0)


def round_to_f16(pred):
    """The predictor with its matrices rounded to float16, the type PowerInfer's converter writes them in."""
    return LayerPredictor(pred.w1.astype(np.float16).astype(np.float32), pred.b1,
                          pred.w2.astype(np.float16).astype(np.float32), pred.b2, pred.threshold)


def train_layer(x, y, rank, epochs=30, batch=256, lr=3e-3, seed=0, init=None):
    """Fit a rank-`rank` predictor to inputs x (N, dim) float32 and labels y (N, n_ff) bool with a
    class-balanced logistic loss (positives weighted by their rarity per neuron), from `init` (a
    LayerPredictor, e.g. rrr_init's) or a random start."""
    rng = np.random.default_rng(seed)
    n, dim = x.shape
    n_ff = y.shape[1]
    mu, sd = x.mean(0), x.std(0) + 1e-6
    xs = (x - mu) / sd  # standardize inputs; folded back into w1 / b1 at the end
    p = np.clip(y.mean(0), 1.0 / n, 1.0 - 1.0 / n)
    wpos, wneg = (0.5 / p).astype(np.float32), (0.5 / (1 - p)).astype(np.float32)
    if init is not None:  # x W1 + b1 = xs (sd W1) + (mu W1 + b1)
        params = [(init.w1 * sd[:, None]).astype(np.float32), (mu @ init.w1 + init.b1).astype(np.float32),
                  init.w2.astype(np.float32).copy(), init.b2.astype(np.float32).copy()]
    else:
        params = [rng.standard_normal((dim, rank)).astype(np.float32) * np.float32(1 / np.sqrt(dim)),
                  np.zeros(rank, np.float32),
                  rng.standard_normal((rank, n_ff)).astype(np.float32) * np.float32(1 / np.sqrt(rank)),
                  np.log(p / (1 - p)).astype(np.float32)]
    m = [np.zeros_like(q) for q in params]
    v = [np.zeros_like(q) for q in params]
    step = 0
    for _ in range(epochs):
        order = rng.permutation(n)
        for s in range(0, n, batch):
            i = order[s:s + batch]
            xb, yb = xs[i], y[i]
            w1, b1, w2, b2 = params
            h_pre = xb @ w1 + b1
            h = np.maximum(h_pre, 0)
            z = h @ w2 + b2
            sig = 1.0 / (1.0 + np.exp(-np.clip(z, -30, 30)))
            g = np.where(yb, wpos * (sig - 1.0), wneg * sig) / len(i)  # d loss / d z, class-balanced
            gw2, gb2 = h.T @ g, g.sum(0)
            gh = (g @ w2.T) * (h_pre > 0)
            gw1, gb1 = xb.T @ gh, gh.sum(0)
            step += 1
            for k, grad in enumerate((gw1, gb1, gw2, gb2)):
                m[k] = 0.9 * m[k] + 0.1 * grad
                v[k] = 0.999 * v[k] + 0.001 * grad * grad
                params[k] -= (lr * (m[k] / (1 - 0.9 ** step)) / (np.sqrt(v[k] / (1 - 0.999 ** step)) + 1e-8)).astype(np.float32)
    w1, b1, w2, b2 = params
    w1_raw = (w1 / sd[:, None]).astype(np.float32)  # x_s = (x - mu) / sd  =>  x_s W1 = x (W1 / sd) - mu (W1 / sd)
    b1_raw = (b1 - mu @ w1_raw).astype(np.float32)
    return LayerPredictor(w1_raw, b1_raw, w2, b2, 0.0)


def int8_rows(w_rows):
    """(int8 values, float32 scale per row) of a row-per-output matrix, symmetric rounding to 127 levels."""
    scale = np.abs(w_rows).max(1) / 127.0
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    return np.clip(np.rint(w_rows / scale[:, None]), -127, 127).astype(np.int8), scale


def round_to_int8(pred):
    """The predictor with both matrices rounded to int8 per output row (stored back as float32 on that grid), as
    the runtime evaluates it: decision thresholds are then set on exactly what runs."""
    q1, s1 = int8_rows(pred.w1.T)
    q2, s2 = int8_rows(pred.w2.T)
    w1 = np.ascontiguousarray((q1.astype(np.float32) * s1[:, None]).T)
    w2 = np.ascontiguousarray((q2.astype(np.float32) * s2[:, None]).T)
    return LayerPredictor(w1, pred.b1, w2, pred.b2, pred.threshold)


def threshold_for_recall(pred, x, y, recall):
    """The largest logit threshold keeping at least `recall` of the true activations of (x, y)."""
    z = pred.logits(x)
    pos = z[y]
    if pos.size == 0:
        return float(np.max(z)) + 1.0
    return float(np.quantile(pos, 1.0 - recall))


def evaluate(pred, x, y):
    """recall, precision, predicted and true density of pred on (x, y)."""
    yp = pred.predict(x)
    tp = (yp & y).sum()
    return {"recall": float(tp / max(y.sum(), 1)), "precision": float(tp / max(yp.sum(), 1)),
            "predicted_density": float(yp.mean()), "true_density": float(y.mean())}
