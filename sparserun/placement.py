"""What goes to the GPU under a VRAM budget: `sparserun place` and the on-the-fly plan of --vram-budget.

Cost model (what is modelled): decode is memory-bound on the CPU, so the value of moving an item to the GPU is
the CPU bytes per token it removes, and its cost is the VRAM it takes as stored on the device (device_rows:
float32 rows for F32 models, float16 for F16 / BF16, the file's bytes for Q4_0 and Q8_0, Q8_0-sized rows for
every other type). Items:
- one FFN neuron of layer l (its gate row, up row and down column together): VRAM their device bytes, value =
  the gate row's CPU bytes (the CPU computes the gate of every neuron it owns) plus p * (up row + down column
  bytes), where p is the neuron's activation frequency: the profile's, or without one, measured at first use under
  the policy's own keep rule on a built-in text (builtin_frequencies, cached); every neuron p = 1 under the dense
  policy;
- the attention block of layer l (q, k, v, o and its KV cache of n_ctx positions): value = the projections'
  CPU bytes, read for every token; VRAM = the projections plus the float32 KV cache;
- the output head: value = its CPU bytes (under `--head hot`, its hot rows': the estimate and the exact cold rows
  stay on the CPU).
Not modelled: PCIe transfer and kernel-launch latency (a few vectors of `dim` floats per layer per token), the
GPU's own time (assumed hidden by the CPU's, which overlaps it), the CPU time of attention over the KV cache
(it grows with the context; only the weights are valued), and how the activation frequency depends on the text (the profile's corpus stands in for the user's).

Method: take items in decreasing value per VRAM byte, skipping any that no longer fit (greedy).
Optimality. (1) Within a layer all neurons cost the same c; any set of m of them fits iff m * c fits, so the
best set of size m is the m highest-valued ones (exchange argument: swapping a chosen neuron for an unchosen one
of higher value raises the total at equal cost); taking them in decreasing value is therefore optimal. (2) When
every item costs the same (one weight type, no attention or head items), the whole problem is that case, and
greedy is exactly optimal. (3) With unequal costs, greedy by value density is optimal for the fractional
relaxation, and the integral plan it returns is within the value of one skipped item (at most one attention
block or the head, a few hundredths of the model) of the true 0/1 optimum, since a budget of B' < B filled
exactly by density order is optimal for B'. Budget 0 places nothing; a budget at least the whole model's
device size places everything.

File: GGUF side file "sparserun-placement", fingerprint-bound like the profile: per layer blk.N.gpu_neurons
(neuron ids, float32-stored integers), attn_gpu (n_layer,), output_gpu (1,), and the budget and bytes used.
"""
import hashlib
import os
import sys
from dataclasses import dataclass

import numpy as np

from . import device_rows as R
from .errors import SparserunError
from .side_files import PLACEMENT



def device_matrix_bytes(w):
    """VRAM of a whole matrix's rows in their device format (device_rows)."""
    return w.rows * R.row_bytes(R.row_format(w.qtype), w.cols)


def device_neuron_bytes(L, dim):
    """VRAM of one FFN neuron of layer L: its gate and up rows and its down column, in their device formats."""
    gate = R.row_bytes(R.row_format(L.w_gate.qtype), dim) if L.w_gate is not None else 0
    return gate + R.row_bytes(R.row_format(L.w_up.qtype), dim) + R.row_bytes(R.column_format(L.w_down.qtype), dim)


@dataclass
class Placement:
    fingerprint: str
    budget: int  # bytes of VRAM allowed
    used: int  # bytes of VRAM the plan takes
    gpu_neurons: list  # per layer: sorted int64 ids of the neurons on the GPU
    attn_gpu: np.ndarray  # (n_layer,) bool
    output_gpu: bool
    cpu_bytes_removed: float = 0.0  # modelled CPU bytes per token moved to the GPU
    cpu_bytes_total: float = 0.0  # modelled CPU bytes per token with nothing placed

    def summary(self):
        n = sum(len(g) for g in self.gpu_neurons)
        return (f"VRAM {self.used / 2**20:.1f} of {self.budget / 2**20:.1f} MiB: {n} FFN neurons, "
                f"attention of {int(self.attn_gpu.sum())}/{len(self.attn_gpu)} layers, output head "
                f"{'on GPU' if self.output_gpu else 'on CPU'}; modelled CPU bytes per token "
                f"-{100 * self.cpu_bytes_removed / max(self.cpu_bytes_total, 1):.0f}%")

    @property
    def empty(self):
        return not (self.output_gpu or self.attn_gpu.any() or any(len(g) for g in self.gpu_neurons))


FREQUENCY_TOKENS = 1024  # of the built-in text, for a sparse policy's plan without a profile (builtin_frequencies)
FREQUENCY_WINDOW = 256  # tokens a window of that pass (a context of its own where the model's is shorter)


def builtin_frequencies(model, policy):
    """(n_layer, n_ff) how often each neuron is kept under `policy`'s keep rule (|activation| above the layer's
    threshold; non-zero for the others: ReLU zeros, a predictor's targets), from one dense pass over the first
    FREQUENCY_TOKENS of teal.builtin_text() (Python's documentation, shipped with CPython). All ones under the dense
    policy (every neuron computed: nothing to measure). Cached beside the neuron packs per model and keep rule; the
    pass clears the model's context. Without it a sparse model's plan counts every neuron as hot and fills the budget
    with whole layers of mostly idle neurons."""
    a = model.args
    if policy is None or policy.is_dense:
        return np.ones((a.n_layer, a.n_ff), np.float32)
    from .activations import watch_ffn
    from .ffn_pack import cache_root
    from .teal import builtin_text

    params = policy.layer_params(a.n_layer, a.n_ff)
    thr = np.array([p if isinstance(p, (float, np.floating)) else 0.0 for p in params], np.float32)
    fp = model.gguf.fingerprint()
    path = os.path.join(cache_root(), fp[:32], f"hotness.{hashlib.sha1(thr.tobytes()).hexdigest()[:12]}.npy")
    if os.path.exists(path):
        try:
            freq = np.load(path)
            if freq.shape == (a.n_layer, a.n_ff):
                return freq
        except (OSError, ValueError):
            pass  # damaged: measured again
    ids = model.tokenize(builtin_text())[:FREQUENCY_TOKENS]
    print(f"placement: no profile; neuron hotness under --sparsity {policy.spec} measured on Python's documentation "
          f"text ({len(ids)} tokens), cached in {path}", file=sys.stderr)
    count = np.zeros((a.n_layer, a.n_ff), np.int64)

    def on_layer(li, x, act):  # act: |activation| (T, n_ff)
        count[li] += (act > thr[li]).sum(0)

    with model.context_of(FREQUENCY_WINDOW):
        watch_ffn(model, ids, on_layer, batch=FREQUENCY_WINDOW)
    freq = (count / max(len(ids), 1)).astype(np.float32)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        np.save(path + ".tmp.npy", freq)
        os.replace(path + ".tmp.npy", path)
    except OSError as e:  # an unwritable cache: measured again next time
        print(f"placement: cannot cache the hotness in {path}: {e.strerror or e}", file=sys.stderr)
    return freq


def neuron_cpu_bytes(L, n_ff, p, gate_dense):
    """(n_ff,) the CPU bytes a token reads for each neuron of layer L kept at frequency p: its gate row (every token
    when gate_dense) and p x its up row and down column, in the file's types."""
    b_gate = L.w_gate.row_bytes if L.w_gate is not None else 0
    b_rest = L.w_up.row_bytes + L.w_down.n_bytes / n_ff
    return (b_gate if gate_dense else b_gate * p) + p * b_rest


def attention_cpu_bytes(L):
    """The CPU bytes a token reads for layer L's attention projections (q, k, v, o), in the file's types."""
    return sum(w.n_bytes for w in (L.wq, L.wk, L.wv, L.wo))


def greedy(values, costs, budget):
    """Items in decreasing value per cost (ties: lower index first), each taken if it still fits: a bool mask."""
    order = np.lexsort((np.arange(len(values)), -(values / costs)))
    chosen = np.zeros(len(values), bool)
    used = 0.0
    for i in order:
        if used + costs[i] <= budget:
            chosen[i] = True
            used += costs[i]
    return chosen


def plan(model, budget_bytes, frequency=None, gate_dense=True):
    """The greedy plan (see the module docstring). frequency: (n_layer, n_ff) each neuron's activation frequency
    (None: every neuron hot). gate_dense: the CPU computes the gate of all its neurons (the ReLU / threshold
    policies); False when a predictor picks neurons before any FFN row is read."""
    a = model.args
    freq = np.ones((a.n_layer, a.n_ff), np.float32) if frequency is None else np.asarray(frequency, np.float32)
    budget = int(max(0, budget_bytes))
    values, costs, kinds = [], [], []  # kinds: (0, layer, neuron) | (1, layer) attention | (2,) head
    for li, L in enumerate(model.layers):
        c = device_neuron_bytes(L, a.dim)
        values.append(neuron_cpu_bytes(L, a.n_ff, freq[li], gate_dense))
        costs.append(np.full(a.n_ff, c, np.float64))
        kinds.append(np.stack([np.zeros(a.n_ff, np.int64), np.full(a.n_ff, li), np.arange(a.n_ff)], 1))
        values.append(np.array([attention_cpu_bytes(L)], np.float64))
        kv_cache = 2 * model.n_ctx * a.kv_dim * 4  # the layer's float32 KV cache moves to the GPU with it
        costs.append(np.array([sum(device_matrix_bytes(w) for w in (L.wq, L.wk, L.wv, L.wo)) + kv_cache], np.float64))
        kinds.append(np.array([[1, li, 0]]))
    out = model.output if model.head is None else model.head.hot_w  # under --head hot: its exact rows (head.py)
    values.append(np.array([out.n_bytes], np.float64))
    costs.append(np.array([device_matrix_bytes(out)], np.float64))
    kinds.append(np.array([[2, 0, 0]]))
    values, costs, kinds = np.concatenate(values), np.concatenate(costs), np.concatenate(kinds)
    chosen = greedy(values, costs, budget)
    used = int(costs[chosen].sum())
    gpu = [np.sort(kinds[chosen & (kinds[:, 0] == 0) & (kinds[:, 1] == li), 2]) for li in range(a.n_layer)]
    attn = np.zeros(a.n_layer, bool)
    attn[kinds[chosen & (kinds[:, 0] == 1), 1]] = True
    return Placement(model.gguf.fingerprint(), budget, used, gpu, attn, bool(chosen[kinds[:, 0] == 2].any()),
                     float(values[chosen].sum()), float(values.sum()))


def device_bytes(model):
    """VRAM the whole model takes on the device (the budget that places everything)."""
    return plan(model, 1 << 62).used


def save_placement(p, path):
    tensors = {"attn_gpu": p.attn_gpu.astype(np.float32), "output_gpu": np.array([float(p.output_gpu)], np.float32)}
    for li, g in enumerate(p.gpu_neurons):
        # float32 holds integers exactly below 2**24; an empty layer is stored as [-1] (GGUF has no empty tensors)
        tensors[f"blk.{li}.gpu_neurons"] = g.astype(np.float32) if len(g) else np.array([-1.0], np.float32)
    PLACEMENT.write(path, p.fingerprint, {"budget_bytes": int(p.budget), "used_bytes": int(p.used),
                                          "cpu_bytes_removed": float(p.cpu_bytes_removed),
                                          "cpu_bytes_total": float(p.cpu_bytes_total)}, tensors)


def load_placement(path, model):
    """Read a placement and check it against `model` (fingerprint, layer count, neuron ids). One-line errors."""
    def build(v, t):
        attn = t["attn_gpu"] > 0.5
        gpu = []
        for li in range(len(attn)):
            g = t[f"blk.{li}.gpu_neurons"].astype(np.int64)
            gpu.append(np.sort(g[g >= 0]))
        return int(v["budget_bytes"]), int(v["used_bytes"]), gpu, attn, bool(t["output_gpu"][0] > 0.5), \
            float(v["cpu_bytes_removed"]), float(v["cpu_bytes_total"])

    fields, fingerprint = PLACEMENT.read(path, build, model)
    p = Placement(fingerprint, *fields)
    a = model.args
    if len(p.gpu_neurons) != a.n_layer or any(len(g) and (g[-1] >= a.n_ff or len(np.unique(g)) != len(g))
                                              for g in p.gpu_neurons):
        raise SparserunError(f"{path}: placement does not match the model's shape ({a.n_layer} layers, {a.n_ff} neurons)")
    return p
