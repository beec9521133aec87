"""`--trace FILE`: which parts of the model ran for which token, as JSON lines.

The first line is a header naming the model (path, tensor fingerprint, layers, FFN width) and the policy; then one
line per token the model computed (prompt tokens and generated ones, in order):

    {"pos": 12, "token": 450, "piece": " the", "head": 1.0,
     "layers": [{"kept": 0.107, "read": {"attn": 1.0, "ffn_gate": 1.0, "ffn_up": 0.107, "ffn_down": 0.107}}, ...]}

kept: the share of the layer's FFN neurons the policy kept for this token (1.0 for the dense FFN); read: the share
of each matrix's rows (down: columns) that was read for it: a sparse decode token reads its kept neurons' up rows
and down columns, and the gate rows it selects with (all of them for CATS / threshold, the kept ones for a
predictor); a prompt batch, which runs dense matmuls with the dropped neurons zeroed, reads every row; attention is
read whole (under `teal`: attn_qkv and attn_o, the shares of their columns read, and the FFN's shares are its
inputs' kept shares); head: the share of the output head's rows computed exactly (`--head hot`). With ids, each layer also
lists the kept neuron ids. Under the CPU/GPU hybrid the layers report the CPU's share (its cold neurons). Off by
default: the model holds no Trace then, and no hook runs.
"""
import json

import numpy as np

from .errors import SparserunError

ALL = {"attn": 1.0, "ffn_gate": 1.0, "ffn_up": 1.0, "ffn_down": 1.0}


class Trace:
    def __init__(self, path, model, ids=False, sparsity=None, head=None):
        self.path, self.ids, self.model = str(path), bool(ids), model
        try:
            self.fh = open(self.path, "w")
        except OSError as e:
            raise SparserunError(f"{self.path}: cannot write the trace: {e.strerror}") from None
        a = model.args
        self._write({"trace": 1, "model": model.path, "fingerprint": model.gguf.fingerprint(), "n_layer": a.n_layer,
                     "n_ff": a.n_ff, "sparsity": sparsity or model.policy.spec,
                     "head": head or ("dense" if model.head is None else f"hot:{len(model.head.hot)}")})
        self._rows = None

    def _write(self, obj):
        self.fh.write(json.dumps(obj) + "\n")

    def begin(self, ids, pos0):
        """A forward pass over tokens ids at positions pos0.. starts: the layers report into it (layer)."""
        self._ids, self._pos0 = list(ids), pos0
        self._rows = [[] for _ in range(self.model.args.n_layer)]
        self._inputs = [[{} for _ in ids] for _ in range(self.model.args.n_layer)]

    def layer(self, li, kept, read, ids=None):
        """The next token's entry for layer li: kept share, read shares (a dict as ALL), kept neuron ids or None."""
        entry = {"kept": round(float(kept), 6), "read": {k: round(float(v), 6) for k, v in read.items()}}
        if self.ids and ids is not None:
            entry["ids"] = np.asarray(ids, np.int64).tolist()
        self._rows[li].append(entry)

    def inputs(self, li, key, shares):
        """Input sparsity (teal.py) read these shares of matrix group key's columns in layer li, one per token of the
        pass (a decode token: one); they replace the group's whole-matrix entries in that token's read."""
        for t, v in enumerate(shares):
            self._inputs[li][t][key] = v

    def dense(self, li, T):
        """A dense FFN ran for the pass's T tokens in layer li."""
        n = self.model.args.n_ff
        for _ in range(T):
            self.layer(li, 1.0, ALL, np.arange(n) if self.ids else None)

    def end(self, head_shares):
        """The pass is done: one line per token (head_shares: per token, the share of the head's rows computed
        exactly; 0 for a prompt token whose logits were not asked for)."""
        tok = self.model.tokenizer
        for t, token in enumerate(self._ids):
            layers = [rows[t] if t < len(rows) else None for rows in self._rows]
            for entry, extra in zip(layers, self._inputs):
                if entry is not None and extra[t]:
                    read = entry["read"]
                    if "attn_qkv" in extra[t]:
                        read.pop("attn", None)
                    if "ffn_gate_up" in extra[t]:
                        share = extra[t].pop("ffn_gate_up")
                        read.update({k: share for k in ("ffn_gate", "ffn_up") if k in read})
                    read.update({k: round(float(v), 6) for k, v in extra[t].items()})
            self._write({"pos": self._pos0 + t, "token": int(token), "piece": tok.decode([int(token)]),
                         "head": round(float(head_shares[t]), 6), "layers": layers})
        self.fh.flush()
        self._rows = None

    def close(self):
        self.fh.close()


def read_trace(path, fingerprint=None):
    """(header, token lines) of a trace file; refused in one line if it is not one (or is another model's, where
    fingerprint is given)."""
    try:
        with open(path) as fh:
            lines = [json.loads(line) for line in fh if line.strip()]
    except OSError as e:
        raise SparserunError(f"{path}: cannot read the trace: {e.strerror}") from None
    except json.JSONDecodeError:
        raise SparserunError(f"{path}: not a trace (a line is not JSON)") from None
    if not lines or lines[0].get("trace") != 1:
        raise SparserunError(f"{path}: not a trace (no header line)")
    if fingerprint is not None and lines[0].get("fingerprint") != fingerprint:
        raise SparserunError(f"{path}: a trace of another model ({lines[0].get('model')})")
    return lines[0], lines[1:]


def kept_matrix(tokens):
    """(n_layer, n_tokens) kept shares of a trace's token lines (NaN where a layer did not report)."""
    n_layer = max((len(t["layers"]) for t in tokens), default=0)
    m = np.full((n_layer, len(tokens)), np.nan)
    for j, t in enumerate(tokens):
        for li, e in enumerate(t["layers"]):
            if e is not None:
                m[li, j] = e["kept"]
    return m


def plot_trace(path, out, fingerprint=None):
    """Draw a trace's layer x token heat map of kept shares to the PNG out."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SparserunError("--plot needs matplotlib: pip install 'sparserun[plot]'") from None
    header, tokens = read_trace(path, fingerprint)
    m = kept_matrix(tokens)
    fig, ax = plt.subplots(figsize=(min(24, 4 + 0.12 * m.shape[1]), 1.5 + 0.25 * m.shape[0]))
    im = ax.imshow(m, aspect="auto", cmap="viridis", interpolation="nearest", vmin=0, vmax=1)
    ax.set_xlabel("token (position)")
    ax.set_ylabel("layer")
    ax.set_title(f"kept share of FFN neurons, {header.get('sparsity')}")
    if len(tokens) <= 64:
        ax.set_xticks(range(len(tokens)), [repr(t["piece"])[1:-1][:8] for t in tokens], rotation=90, fontsize=6)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return m
