"""Offline training of per-layer activation predictors from a model's own activations.

Labels: for each layer, which neurons are active on each token of a corpus: non-zero for ReLU-family
FFNs, |act(gate)| above the layer threshold for SwiGLU (the thresholds for `sparsity`, from the
collected activations). Tokens are split by position into train (60%), validation (20%) and held-out
test (20%). Per layer, every candidate rank is trained; its decision threshold is set on the
validation split to keep `target_recall` of the true activations; the chosen rank is the smallest
whose validation density (fraction predicted active) is within 10% of the best rank's. Reported
figures are on the held-out split.

Each rank starts from reduced-rank regression on the layer's own pre-activations (lowrank.rrr_init: the
best rank-r linear map onto the gate's values for this data, closed form) and is then fine-tuned on the
labels; the fine-tuned predictor is kept only when it beats its start on the validation split. Weights are
rounded to int8 per output row before the decision threshold is set, as the runtime evaluates them.

form="powerinfer" trains PowerInfer's form instead (ReLU models only): no biases, the FFN's residual input, hidden
size 2r from lowrank.bias_free_init, float16 weights; no fine-tuning (the bias-free start is the best linear map of
its rank onto the gate's sign). `sparserun export-powerinfer` writes such predictors into a PWRI file.
"""
import numpy as np

from sparserun.errors import SparserunError
from sparserun.activations import watch_ffn

from sparserun.weights import Acts

from .lowrank import bias_free_init, evaluate, round_to_f16, round_to_int8, rrr_init, threshold_for_recall, train_layer

RANKS = (16, 32, 64, 128)


def collect(model, ids, batch=256, residual=False):
    """Per layer: FFN inputs (N, dim) (residual: the residual stream before ffn_norm) and |activation| (N, n_ff) over
    ids, from the dense model."""
    xs = [[] for _ in model.layers]
    mags = [[] for _ in model.layers]

    def on_layer(li, x, mag):
        xs[li].append(x.copy())
        mags[li].append(mag)

    watch_ffn(model, ids, on_layer, batch, residual=residual)
    return [np.concatenate(x) for x in xs], [np.concatenate(m) for m in mags]


def train_predictors(model, ids, target_recall=0.95, sparsity=0.5, ranks=RANKS, epochs=30, progress=None,
                     form="sparserun"):
    """Returns (PredictorSet, per-layer report dicts). form: "sparserun" or "powerinfer" (see the module doc)."""
    from .format import PredictorSet

    if len(ids) < 50:
        raise SparserunError(f"training predictors needs at least 50 tokens of text, got {len(ids)}")
    if not 0.0 < target_recall < 1.0:
        raise SparserunError(f"target recall must be in (0, 1), got {target_recall}")
    relu = model.args.activation in ("relu", "relu_sym")
    powerinfer = form == "powerinfer"
    if form not in ("sparserun", "powerinfer"):
        raise SparserunError(f"predictor form must be sparserun or powerinfer, got {form!r}")
    if powerinfer and not relu:
        raise SparserunError(f"{model.path}: PowerInfer's predictors are for ReLU models (its sparse graph runs ReLU); "
                             f"this model's FFN is {model.args.activation}")
    xs, mags = collect(model, ids, residual=powerinfer)
    n = len(ids)
    tr, va = slice(0, int(0.6 * n)), slice(int(0.6 * n), int(0.8 * n))
    te = slice(int(0.8 * n), n)
    layers, label_thresholds, report = [], [], []
    ffn_params = model.args.dim * model.args.n_ff * (3 if model.args.gated else 2)
    for li, (x, a) in enumerate(zip(xs, mags)):
        t = 0.0 if relu else float(np.quantile(a[tr], sparsity))
        y = a > t
        L = model.layers[li]
        wsel = L.w_gate if L.w_gate is not None else L.w_up  # the matrix whose activation decides activity
        # (N_train, n_ff) pre-activations (of the normalized input: PowerInfer's form fits its own map)
        g = None if powerinfer else wsel.matmul(Acts(np.ascontiguousarray(x[tr])))
        w = wsel.dequantize()  # (n_ff, dim)
        trials = []
        usable = [r for r in ranks if r <= min(len(x[tr]), model.args.n_ff) and r < model.args.dim] or [min(ranks)]
        for r in usable:  # a rank of dim or more costs as much as the gate itself
            if powerinfer:  # hidden size 2 r
                cands = [round_to_f16(bias_free_init(x[tr], w * L.ffn_norm[None, :], r // 2))]
            else:
                cands = [rrr_init(x[tr], g, w, r)]
                if epochs > 0:
                    cands.append(train_layer(x[tr], y[tr], r, epochs=epochs, seed=li, init=cands[0]))
                cands = list(map(round_to_int8, cands))
            best_c = None
            for p in cands:  # thresholds are set on the rounded weights the runtime uses
                p.threshold = threshold_for_recall(p, x[va], y[va], target_recall)
                d = evaluate(p, x[va], y[va])["predicted_density"]
                if best_c is None or d < best_c[1]:
                    best_c = (p, d)
            trials.append((r, best_c[0], best_c[1]))
        best = min(d for _, _, d in trials)
        r, p, _ = next(tr_ for tr_ in trials if tr_[2] <= 1.1 * best)
        held = evaluate(p, x[te], y[te])
        report.append({"layer": li, "rank": r, **held, "size_pct_of_ffn": 100.0 * p.n_params / ffn_params})
        layers.append(p)
        label_thresholds.append(t)
        if progress:
            progress(li + 1, len(xs), report[-1])
    return PredictorSet(model.gguf.fingerprint(), layers, np.array(label_thresholds, np.float32), target_recall,
                        "residual" if powerinfer else "ffn"), report


def format_report(report):
    lines = ["| layer | rank | recall | precision | predicted density | true density | size % of FFN |",
             "|---|---|---|---|---|---|---|"]
    for r in report:
        lines.append(f"| {r['layer']} | {r['rank']} | {r['recall']:.3f} | {r['precision']:.3f} | "
                     f"{r['predicted_density']:.3f} | {r['true_density']:.3f} | {r['size_pct_of_ffn']:.2f} |")
    return "\n".join(lines)
