"""How much of the hybrid's GPU half hides behind its CPU half. Three decode passes over the same tokens, each
timing the FFN layers one way: as the hybrid runs them (GPU queued, CPU computes, one synchronisation per layer),
the GPU half alone (queued, then waited for; the CPU half after it, untimed) and the CPU half alone (after the
GPU half, untimed). Each half is timed on its first run in a layer, from memory as in real use, not from a cache
the other timing warmed. overlap = (gpu + cpu - both) / min(gpu, cpu): 1 when the shorter half is fully hidden,
0 when the halves run one after the other. The FFN timings run with the layers' chains off (a hot half queued behind
its device attention block, hybrid.GPUAttention.chain, is not the FFN call's to time); whole tokens are timed with
the chains off and on (as the hybrid runs): what the chain saves a token. Then the cost of one kernel launch, plain and prepared
(gpu_kernels.prepare).

    python benchmarks/hybrid_overlap.py model.gguf --budget 0.25 --sparsity threshold:0 -n 32
"""
import argparse
import time

import numpy as np

import sparserun
from sparserun.placement import device_bytes


class TimedFFN:
    """A HybridFFN whose layers are timed one way: mode "both", "gpu" or "cpu" (see the module docstring)."""

    def __init__(self, ffn):
        self.ffn, self.mode, self.total = ffn, "both", 0.0

    def __getattr__(self, name):
        return getattr(self.ffn, name)

    def __call__(self, li, acts):
        f = self.ffn
        if self.mode == "both" or f.layers[li] is None:  # (a chained layer's hot half is already queued)
            t0 = time.perf_counter()
            y = f(li, acts)
            if self.mode == "both":
                self.total += time.perf_counter() - t0
            return y
        x = np.ascontiguousarray(acts.x, np.float32)
        t0 = time.perf_counter()
        y_gpu = f.queue_hot(li, x)
        f.stream.synchronize()
        t1 = time.perf_counter()
        y = np.zeros_like(x) if f.cpu_empty[li] else f.cpu(li, acts)
        t2 = time.perf_counter()
        self.total += (t1 - t0) if self.mode == "gpu" else (t2 - t1)
        return y + y_gpu


def launch_costs(ffn, reps=200):
    """Microseconds per launch of the first placed layer's hot_ffn_in for one token: the plain numba launch, then
    the prepared one (each launch waited for, so both include the kernel itself)."""
    li = next(i for i, p in enumerate(ffn.layers) if p is not None)
    prepared = ffn._buffers(li, 1)["runs"][0]
    out = []
    for run in (prepared.plain, prepared):
        run()
        ffn.stream.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            run()
        ffn.stream.synchronize()
        out.append(1e6 * (time.perf_counter() - t0) / reps)
    return out


def set_chains(model, chains, on):
    """Turn the layers' attention-to-FFN chains on (as the hybrid built them) or off (the hot half queued from the CPU)."""
    for li, chain in chains.items():
        model.layers[li].gpu_attn.chain = chain if on else None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--budget", type=float, nargs="+", default=[0.25], help="shares of the model's device bytes")
    ap.add_argument("--sparsity", default="threshold:0")
    ap.add_argument("-n", type=int, default=32, help="decode tokens")
    ap.add_argument("-t", "--threads", type=int)
    a = ap.parse_args()
    probe = sparserun.load(a.model, n_ctx=a.n + 8, threads=a.threads)  # the KV cache's size counts
    total = device_bytes(probe)
    del probe
    print("| budget | placed | GPU half ms/token | CPU half ms/token | both ms/token | overlap | token ms, chained "
          "| token ms, unchained |")
    print("|---|---|---|---|---|---|---|---|")
    for frac in a.budget:
        m = sparserun.load(a.model, n_ctx=a.n + 8, threads=a.threads, sparsity=a.sparsity, device="cuda",
                           vram_budget=frac * total / 2**30)
        chains = {li: L.gpu_attn.chain for li, L in enumerate(m.layers) if L.gpu_attn is not None}
        timed = TimedFFN(m.sparse)
        m.use_ffn(timed)
        ms, token = {}, {}
        # a chained pass first to compile and warm up, then the halves, both unchained, and chained
        for mode in ("chained", "gpu", "cpu", "both", "chained"):
            set_chains(m, chains, mode == "chained")
            m.reset()
            timed.mode, timed.total = "both" if mode == "chained" else mode, 0.0
            ids = list(range(1, 5))
            m.eval(ids)
            timed.total = 0.0
            t0 = time.perf_counter()
            for i in range(a.n):  # decode: one new token a call over the growing context
                ids.append(5 + i)
                m.eval(ids)
            token[mode] = 1e3 * (time.perf_counter() - t0) / a.n
            ms[mode] = 1e3 * timed.total / a.n
        g, c, b = ms["gpu"], ms["cpu"], ms["both"]
        ov = (g + c - b) / min(g, c) if min(g, c) > 0 else float("nan")
        print(f"| {frac:g} | {m.placement.summary()} | {g:.2f} | {c:.2f} | {b:.2f} | {ov:.2f} | {token['chained']:.2f} "
              f"| {token['both']:.2f} |")
    plain, fast = launch_costs(timed.ffn)
    print(f"\none hot_ffn_in launch, waited for: plain {plain:.1f} us, prepared {fast:.1f} us")


if __name__ == "__main__":
    main()
