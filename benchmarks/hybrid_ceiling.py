"""What a VRAM budget can give at most: the CPU bytes a decode token still reads under the hybrid's plan, against
CPU dense and the CPU's own sparse path. No GPU needed: it runs placement.plan as `--vram-budget` does.

    python benchmarks/hybrid_ceiling.py model.gguf --sparsity threshold:0 --budget 0.1 0.25 0.5 1

Per budget (a share of the model's device bytes): the plan, the modelled CPU bytes per token left, and the ceiling
of the hybrid's decode speed-up: CPU dense bytes / bytes left, as if the GPU's half and every transfer cost nothing
and the CPU read every byte at one rate. A measured hybrid can only come in under it (each placed layer also waits
for one GPU round trip). The bytes left are counted with the neurons' measured keep frequencies (the profile's, or
placement.builtin_frequencies'); "--uniform" plans as if every neuron were equally hot (what the plan did without a
profile before those were measured) and counts that plan's bytes the same way. Under `predictor` the predictors' own
reads are not counted.
"""
import argparse

import numpy as np

import sparserun
from sparserun import placement as P
from sparserun.hybrid import make_placement


def dense_bytes(model):
    """CPU bytes a dense decode token reads: every layer matrix and the head."""
    total = sum(w.n_bytes for L in model.layers for w in (L.wq, L.wk, L.wv, L.wo, L.w_gate, L.w_up, L.w_down)
                if w is not None)
    return total + model.output.n_bytes


def cpu_bytes_left(model, p, freq, gate_dense):
    """CPU bytes a token still reads under plan p, with the neurons kept at frequencies freq (n_layer, n_ff)."""
    left = 0.0 if p.output_gpu else model.output.n_bytes
    for li, L in enumerate(model.layers):
        cpu = np.ones(model.args.n_ff, bool)
        cpu[p.gpu_neurons[li]] = False
        left += float(P.neuron_cpu_bytes(L, model.args.n_ff, freq[li], gate_dense)[cpu].sum())
        if not p.attn_gpu[li]:
            left += P.attention_cpu_bytes(L)
    return left


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--sparsity", default="threshold:0")
    ap.add_argument("--budget", type=float, nargs="+", default=[0.1, 0.25, 0.5, 1.0])
    ap.add_argument("--uniform", action="store_true", help="every neuron equally hot")
    a = ap.parse_args()
    m = sparserun.load(a.model, n_ctx=64, sparsity=a.sparsity)
    total, dense = P.device_bytes(m), dense_bytes(m)
    print(f"{a.model}: CPU dense {dense / 2**20:.0f} MiB a token; device size {total / 2**20:.0f} MiB; "
          f"--sparsity {a.sparsity}{' (planned with every neuron equally hot)' if a.uniform else ''}")
    gate_dense = m.policy.gate_dense
    freq = P.builtin_frequencies(m, m.policy)
    sparse = cpu_bytes_left(m, P.plan(m, 0), freq, gate_dense)
    print(f"CPU sparse {sparse / 2**20:.0f} MiB a token ({dense / sparse:.2f}x fewer than dense)\n")
    print("| budget | placed | CPU MiB a token left | ceiling vs CPU dense | vs CPU sparse |")
    print("|---|---|---|---|---|")
    for frac in a.budget:
        if a.uniform:
            p = P.plan(m, frac * total, None, gate_dense=gate_dense)
        else:
            p = make_placement(m, frac * total / 2**30)
        left = cpu_bytes_left(m, p, freq, gate_dense)
        n = sum(len(g) for g in p.gpu_neurons)
        placed = (f"{p.used / 2**20:.0f} MiB: {n} neurons, attention {int(np.sum(p.attn_gpu))}/{len(p.attn_gpu)}, "
                  f"head {'GPU' if p.output_gpu else 'CPU'}")
        ceil = f"{dense / left:.2f}x" if left > 0 else "unbounded"
        vs = f"{sparse / left:.2f}x" if left > 0 else "unbounded"
        print(f"| {frac:g} | {placed} | {left / 2**20:.0f} | {ceil} | {vs} |")


if __name__ == "__main__":
    main()
