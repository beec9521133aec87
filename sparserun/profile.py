"""Neuron hotness profiles: how often each FFN neuron is active over a text corpus.

Per layer and neuron: the fraction of tokens on which it is active and its mean |activation|; per
layer: a histogram of |activation| over log-spaced bins, from which thresholds for any target
sparsity are derived later (CATS / TEAL style). "Active" is non-zero for ReLU-family FFNs and
|act| above the layer's threshold for SwiGLU (given, or derived from a first pass's histogram for a
target sparsity).

File format: a GGUF (written with the gguf package, no executable content) with architecture
"sparserun-profile" (side_files.py); keys sparserun.profile.{model_fingerprint, tokens, activation}
and per layer the float32 tensors blk.N.frequency (n_ff), blk.N.mean_magnitude (n_ff),
blk.N.histogram (bins + 1: exact zeros first); plus hist_edges (bins + 1) and thresholds (n_layer); and for the
hot/cold output head (head.py) token_frequency (n_vocab: the corpus's tokens plus the dense model's greedy tokens
over it) and head_covariance (dim, dim: the mean outer product of the head's inputs); and the input sparsity's
calibration (teal.TealTables: tensors teal.*), from which `--sparsity teal:S` selects its thresholds for any S. A
profile is bound to its model by the model's tensor fingerprint.
"""
from dataclasses import dataclass, field

import numpy as np

from .errors import SparserunError
from .side_files import PROFILE
from .activations import watch_ffn

EDGES = np.logspace(-6, 3, 361).astype(np.float32)  # 360 log bins from 1e-6 to 1e3; below -> first bin


@dataclass
class Profile:
    fingerprint: str
    tokens: int
    activation: str
    frequency: np.ndarray  # (n_layer, n_ff) fraction of tokens the neuron is active
    mean_magnitude: np.ndarray  # (n_layer, n_ff) mean |activation|
    histogram: np.ndarray  # (n_layer, bins + 1) counts; column 0 counts exact zeros
    thresholds: np.ndarray  # (n_layer,) the "active" rule used (0 = non-zero)
    edges: np.ndarray = field(default_factory=lambda: EDGES.copy())
    token_frequency: np.ndarray = None  # (n_vocab,) the head's hot set ranks tokens by it; None in older profiles
    head_covariance: np.ndarray = None  # (dim, dim) mean h h^T of the head's inputs (the cold rows' estimate)
    teal: object = None  # teal.TealTables over the corpus's first CALIBRATION_TOKENS, or None

    def threshold_for(self, sparsity):
        """Per-layer thresholds under which `sparsity` of all activations fall (from the histograms)."""
        out = []
        for h in self.histogram:
            cum = np.cumsum(h) / max(h.sum(), 1)
            if cum[0] >= sparsity:  # the exact zeros alone reach it (ReLU)
                out.append(0.0)
                continue
            k = int(np.searchsorted(cum[1:], sparsity))  # bin k covers [edges[k], edges[k+1])
            k = min(k, len(self.edges) - 2)
            prev = cum[k]
            frac = (sparsity - prev) / max(cum[k + 1] - prev, 1e-12)  # interpolate within the bin (log scale)
            lo, hi = np.log(self.edges[k]), np.log(self.edges[k + 1])
            out.append(float(np.exp(lo + frac * (hi - lo))))
        return out

    def summary(self):
        """Per layer: sparsity (1 - mean frequency) and the fraction of neurons that covers 80% of activations."""
        rows = []
        for li, f in enumerate(self.frequency):
            total = f.sum()
            share = np.cumsum(np.sort(f)[::-1]) / total if total > 0 else np.ones_like(f)
            cover = (int(np.searchsorted(share, 0.8)) + 1) / len(f) if total > 0 else 0.0
            rows.append({"layer": li, "sparsity": float(1.0 - f.mean()), "neurons_for_80pct": float(cover)})
        return rows


class HeadStats:
    """The hot head's statistics over a text (watch_ffn's on_head): the text's tokens and the dense model's argmax
    over it counted together, and the head inputs' second moment; result() gives them as a profile stores them."""

    def __init__(self, model, ids):
        self.n = len(ids)
        self.tokens = np.bincount(np.asarray(ids, np.int64), minlength=model.args.n_vocab).astype(np.float64)
        self.cov = np.zeros((model.args.dim, model.args.dim), np.float64)

    def __call__(self, x, greedy):
        self.tokens += np.bincount(greedy, minlength=len(self.tokens))
        self.cov += x.T.astype(np.float64) @ x

    def result(self):
        """(token frequency (n_vocab,), mean h h^T (dim, dim)), float32."""
        return (self.tokens / (2 * self.n)).astype(np.float32), (self.cov / self.n).astype(np.float32)


def record(model, ids, thresholds, batch=256, progress=None, head=None):
    """Run the dense model over ids; accumulate per-neuron activity and per-layer histograms (and with head, a
    HeadStats, the head's statistics)."""
    n_layer, n_ff = model.args.n_layer, model.args.n_ff
    count = np.zeros((n_layer, n_ff), np.int64)
    mag = np.zeros((n_layer, n_ff), np.float64)
    hist = np.zeros((n_layer, len(EDGES)), np.int64)
    def on_layer(li, x, a):
        count[li] += (a > thresholds[li]).sum(0)
        mag[li] += a.sum(0)
        zeros = a == 0
        hist[li, 0] += zeros.sum()
        nz = a[~zeros]
        hist[li, 1:] += np.histogram(np.clip(nz, EDGES[0], EDGES[-1] * 0.999), bins=EDGES)[0]

    watch_ffn(model, ids, on_layer, batch, progress, head)
    return count, mag, hist


def profile_model(model, ids, target_sparsity=0.5, thresholds=None, batch=256, progress=None, teal=False, text=""):
    """A Profile of model over token ids. ReLU-family: active = non-zero. SwiGLU: active = above
    `thresholds` if given, else above the thresholds for `target_sparsity` found by a first pass. teal: also the
    input sparsity's calibration tables over the first teal.CALIBRATION_TOKENS of ids (text: their name)."""
    if len(ids) < 2:
        raise SparserunError("profile needs at least 2 tokens of text")
    n_layer = model.args.n_layer
    relu = model.args.activation == "relu"
    if thresholds is None:
        thresholds = np.zeros(n_layer, np.float32)
        if not relu:
            _, _, hist = record(model, ids, thresholds, batch, progress)
            first = Profile("", len(ids), model.args.activation, np.zeros((n_layer, 1)), np.zeros((n_layer, 1)), hist, thresholds)
            thresholds = np.array(first.threshold_for(target_sparsity), np.float32)
    thresholds = np.asarray(thresholds, np.float32)
    if thresholds.shape != (n_layer,):
        raise SparserunError(f"{len(thresholds)} thresholds for a model of {n_layer} layers")
    head = HeadStats(model, ids)
    count, mag, hist = record(model, ids, thresholds, batch, progress, head)
    n = len(ids)
    tables = None
    if teal:
        from .teal import CALIBRATION_TOKENS, teal_tables

        tables = teal_tables(model, ids[:CALIBRATION_TOKENS], text=text, progress=progress)
    return Profile(model.gguf.fingerprint(), n, model.args.activation, (count / n).astype(np.float32),
                   (mag / n).astype(np.float32), hist, thresholds, EDGES.copy(), *head.result(), tables)


def save_profile(profile, path):
    tensors = {"hist_edges": profile.edges, "thresholds": profile.thresholds}
    for li in range(profile.frequency.shape[0]):
        tensors[f"blk.{li}.frequency"] = profile.frequency[li]
        tensors[f"blk.{li}.mean_magnitude"] = profile.mean_magnitude[li]
        tensors[f"blk.{li}.histogram"] = profile.histogram[li]
    if profile.token_frequency is not None:
        tensors["token_frequency"] = profile.token_frequency
        tensors["head_covariance"] = profile.head_covariance
    values = {"tokens": int(profile.tokens), "activation": profile.activation}
    if profile.teal is not None:
        tensors.update(profile.teal.tensors())
        values.update(profile.teal.values())
    PROFILE.write(path, profile.fingerprint, values, tensors)


def load_profile(path, model=None):
    """Read a profile; with `model`, refuse one made for another model. Errors are one line."""
    from .teal import TealTables

    def build(v, t):
        n_layer = len(t["thresholds"])
        layers = lambda key: np.stack([t[f"blk.{i}.{key}"] for i in range(n_layer)])  # noqa: E731
        return int(v["tokens"]), str(v["activation"]), layers("frequency"), layers("mean_magnitude"), \
            layers("histogram").astype(np.int64), t["thresholds"], t["hist_edges"], t.get("token_frequency"), \
            t.get("head_covariance"), TealTables.read(v, t)

    fields, fingerprint = PROFILE.read(path, build, model)
    return Profile(fingerprint, *fields)


def format_summary(profile):
    rows = profile.summary()
    lines = [f"profile over {profile.tokens} tokens ({profile.activation} FFN; active = "
             + ("non-zero" if not profile.thresholds.any() else "|act| above the layer threshold") + ")",
             "| layer | sparsity | neurons covering 80% of activations | threshold |", "|---|---|---|---|"]
    for r, t in zip(rows, profile.thresholds):
        lines.append(f"| {r['layer']} | {r['sparsity']:.3f} | {r['neurons_for_80pct']:.3f} | {t:.4g} |")
    return "\n".join(lines)


def plot_profile(profile, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SparserunError("--plot needs matplotlib: pip install 'sparserun[plot]'") from None
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    freq = np.sort(profile.frequency, axis=1)[:, ::-1]
    im = a1.imshow(freq, aspect="auto", cmap="viridis", interpolation="nearest")
    a1.set(xlabel="neurons, sorted by activation frequency", ylabel="layer", title="neuron hotness")
    a1.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    fig.colorbar(im, ax=a1, label="fraction of tokens active")
    for li, f in enumerate(freq):
        share = np.cumsum(f) / max(f.sum(), 1e-12)
        a2.plot(np.arange(1, len(f) + 1) / len(f), share, lw=1, label=f"layer {li}" if li in (0, len(freq) - 1) else None)
    a2.set(xlabel="fraction of neurons (hottest first)", ylabel="share of activations", title="CDF of activations")
    a2.grid(alpha=0.3)
    a2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
