"""Decode speed against perplexity for sparsity policies on one model: the Pareto picture of dense, CATS and teal.

    python benchmarks/sparsity_pareto.py MODEL -f heldout.txt --sparsity threshold:cats25.json \
        --sparsity teal:teal25.gguf ... [-n 32 -r 5] [--ctx 512] [--chunks N] [-o pareto.png] [--json out.json]

Decode tokens/s of every policy and of dense come from one `sparserun bench` run (interleaved repetitions, medians);
perplexity from `sparserun perplexity`'s chunks of the held-out text under each policy. The plot puts each policy at
(perplexity relative to dense, decode speed relative to dense); the table is printed as markdown.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import sparserun  # noqa: E402
from sparserun.bench import run_bench  # noqa: E402
from sparserun.perplexity import chunk_tokens, model_perplexity, summary  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("-f", "--file", required=True, help="held-out text")
    ap.add_argument("--sparsity", action="append", required=True)
    ap.add_argument("-n", type=int, default=32)
    ap.add_argument("-r", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=None)
    ap.add_argument("-o", "--plot", default=None, help="PNG to draw")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    res = run_bench(a.model, modes=("dense", "sparse"), n_prompt=0, n_gen=a.n, reps=a.r, threads=a.threads,
                    sparsity=a.sparsity, fidelity_tokens=8)
    speed = {r["mode"]: r["tokens_per_s"] for r in res["results"]}
    rows = []
    for spec in ["dense"] + a.sparsity:
        m = sparserun.load(a.model, threads=a.threads, n_ctx=a.ctx, sparsity=spec)
        chunks = chunk_tokens(m.tokenize(open(a.file, errors="replace").read()), a.ctx, a.chunks, m.tokenizer.bos_id)
        ppl, err = summary(model_perplexity(m, chunks))
        rows.append({"policy": spec, "tps": speed["dense" if spec == "dense" else f"sparse {spec}"], "ppl": ppl,
                     "ppl_err": err})
        print(f"{spec}: PPL {ppl:.4f} +/- {err:.4f}", file=sys.stderr)
    base = rows[0]
    print("| policy | decode t/s | vs dense | perplexity | vs dense |\n|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['policy']} | {r['tps']:.2f} | {r['tps'] / base['tps']:.2f}x | {r['ppl']:.3f} +/- {r['ppl_err']:.3f} | "
              f"{100 * (r['ppl'] / base['ppl'] - 1):+.1f}% |")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"model": a.model, "text": a.file, "rows": rows}, fh, indent=1)
    if a.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        for family, mark in (("dense", "ko"), ("threshold", "s"), ("topk", "^"), ("teal", "o")):
            pts = [r for r in rows if r["policy"].split(":")[0].split("+")[0] == family]
            if pts:
                ax.plot([100 * (r["ppl"] / base["ppl"] - 1) for r in pts], [r["tps"] / base["tps"] for r in pts], mark,
                        label={"threshold": "CATS (threshold)"}.get(family, family))
                for r in pts:
                    ax.annotate(os.path.basename(r["policy"].split(":", 1)[-1]).removesuffix(".json").removesuffix(".gguf"),
                                (100 * (r["ppl"] / base["ppl"] - 1), r["tps"] / base["tps"]), fontsize=7,
                                xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel("perplexity above dense (%)")
        ax.set_ylabel("decode speed / dense")
        ax.set_title(os.path.basename(a.model), fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(a.plot, dpi=120)
        print(f"wrote {a.plot}", file=sys.stderr)


if __name__ == "__main__":
    main()
