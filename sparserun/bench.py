"""`sparserun bench`: tokens/s of this engine (dense and sparse modes) against llama.cpp
(llama-cpp-python) on the same file.

Like llama-bench: a prompt-processing test (pp N: N random tokens in one fresh context) and a decode
test (tg N: N tokens one at a time after a BOS), and with a depth D (-d, llama-bench's --n-depth) both
after a context of D random tokens already in the KV cache (labelled "pp N @ dD"): decode speed at a
long context, where attention reads the whole cache every token. The depth context is computed once
per mode, untimed, and kept (each mode of this engine has its own KV cache; llama.cpp's is cut back to
it). Repetitions are interleaved across modes (rep 1 of every mode, then rep 2, ...) so all modes see
the same machine state; each figure is a median with its standard deviation. Peak RSS of this engine is
read before llama.cpp is loaded and before the fidelity pass. Sparse modes
share the dense mode's model (only the FFN object is swapped), and get fidelity figures against
the dense path over a text: top-1 agreement and mean KL(dense || sparse) of next-token
distributions, decoded token by token as in generation, and the kept fraction of FFN neurons (for
hybrid:F modes, each its own model with part of it on the GPU, the fraction the CPU half computes).
"""
import json
import os
import resource
import statistics
import time

import numpy as np

from .errors import SparserunError

MODES = ("dense", "sparse", "llama.cpp")  # and hybrid:F (F of the model's device size on the GPU, 0 < F <= 1)
DEFAULT_TEXT = ("Once upon a time, in a small village by the sea, there lived an old fisherman and his wife. "
                "Every morning he rowed out past the rocks, and every evening he came home with a basket of "
                "fish, which his wife sold at the market. One day the sea was calm and strangely quiet.")


class SparserunRunner:
    """This engine in one mode: the shared model with this mode's FFN (None = dense) and this mode's own KV
    cache swapped in, so a depth context computed once stays cached for every repetition."""

    def __init__(self, model, ffn=None, head=None):
        self.model, self.ffn, self.head = model, ffn, head
        self.predictor_share = []
        self.kv = model.kv.fresh()

    def _use(self, ids):
        """The context holds exactly ids (a cached prefix is reused; the last one is recomputed)."""
        m = self.model
        m.use_ffn(self.ffn)
        m.use_head(self.head)
        m.use_cache(self.kv)
        if ids:
            m.eval(ids)
        else:
            m.reset()

    def pp(self, ids, context=()):
        context = list(context)
        self._use(context)
        t = time.perf_counter()
        self.model.eval(context + list(ids))
        return time.perf_counter() - t

    def tg(self, context, n):
        ctx = list(context)
        self._use(ctx)
        pred = getattr(self.ffn, "predictor", None)
        p0 = getattr(pred, "seconds", 0.0)
        t = time.perf_counter()
        for _ in range(n):
            ctx.append(int(np.argmax(self.model.eval(ctx)[-1])))
        dt = time.perf_counter() - t
        if hasattr(pred, "seconds"):  # the predictor's own share of the decode time
            self.predictor_share.append((pred.seconds - p0) / dt)
        return dt


class LlamaCppRunner:
    name = "llama.cpp"

    def __init__(self, path, threads, n_ctx):
        import llama_cpp

        from .tokenizer import quiet_stderr

        with quiet_stderr():
            self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                                       n_batch=512, verbose=False)

    def _use(self, ids):
        """The context holds exactly ids: a cached prefix is kept and the rest evaluated, the last token always,
        so its logits are fresh (Llama.eval cuts the KV cache back to n_tokens before it decodes)."""
        from .model import common_prefix

        llm = self.llm
        keep = common_prefix(llm.input_ids[:llm.n_tokens], ids, limit=len(ids) - 1)
        llm.n_tokens = keep
        if ids:
            llm.eval(ids[keep:])

    def _next(self):
        """Greedy next token from the last evaluated token's logits (Llama.eval keeps no scores unless every
        token's logits are requested, so they are read from the context)."""
        return int(np.argmax(np.ctypeslib.as_array(self.llm._ctx.get_logits(), shape=(self.llm.n_vocab(),))))

    def pp(self, ids, context=()):
        self._use(list(context))
        t = time.perf_counter()
        self.llm.eval(ids)
        return time.perf_counter() - t

    def tg(self, context, n):
        self._use(list(context))
        t = time.perf_counter()
        for _ in range(n):
            self.llm.eval([self._next()])
        return time.perf_counter() - t


def peak_rss():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def log_softmax(x):
    x = x.astype(np.float64) - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def fidelity(model, ffn, ids, dense_logits, head=None):
    """Top-1 agreement, mean KL(dense || mode), perplexity of the text under both, and the kept fraction per layer
    over ids, decoding one token at a time through the mode's FFN and head (as generation does)."""
    model.use_ffn(ffn)
    model.use_head(head)
    if ffn is not None:
        ffn.reset_stats()
    if head is not None:
        head.reset_stats()
    model.reset()
    kl = agree = nll = nll_dense = 0.0
    for i in range(len(ids)):  # one row at a time: a 262k vocabulary's rows in float64 are 2 MB each
        row = model.eval(ids[: i + 1])[-1]
        p, q = log_softmax(dense_logits[i]), log_softmax(row)
        kl += float((np.exp(p) * (p - q)).sum())
        agree += int(row.argmax() == dense_logits[i].argmax())
        if i + 1 < len(ids):
            nll, nll_dense = nll - q[ids[i + 1]], nll_dense - p[ids[i + 1]]
    model.use_head(None)
    n = len(ids)
    kept = ffn.kept_fraction() if ffn is not None else np.ones(model.args.n_layer)
    ppl = lambda s: float(np.exp(s / (n - 1))) if n > 1 else float("nan")  # noqa: E731
    kl, top1 = kl / n, agree / n
    extra = {} if head is None else {"cold_argmax_share": head.cold_argmax / max(head.rows, 1),
                                     "cold_rows_computed": head.computed / max(head.rows, 1)}
    return {**extra, "top1_agreement": top1, "mean_kl": kl, "ppl": ppl(nll), "ppl_dense": ppl(nll_dense),
            "kept_per_layer": [float(x) for x in kept], "kept_mean": float(kept.mean()), "tokens": len(ids)}


def hybrid_fraction(mode):
    try:
        f = float(mode.split(":", 1)[1])
    except (IndexError, ValueError):
        f = -1.0
    if not 0.0 < f <= 1.0:
        raise SparserunError(f"bench mode {mode!r}: write hybrid:F with F the fraction of the model on the GPU, 0 < F <= 1")
    return f


def run_bench(path, modes=("dense", "llama.cpp"), n_prompt=64, n_gen=32, reps=3, threads=None, sparsity=("threshold:0",),
              text=None, fidelity_tokens=64, progress=None, depth=0, heads=(), llama_cpp_model=None, trace=None,
              trace_ids=False):
    """Returns a dict: model facts, one row per (mode, test) with t/s median and sd, and fidelity of
    every sparse mode against dense. 'sparse' in modes expands to one mode per sparsity spec; each head spec of
    heads other than dense adds a mode with the dense FFN and that output head (head.py). depth: tokens
    of context in the cache before each test. llama_cpp_model: the file llama.cpp runs instead of path (a plain GGUF
    of a PowerInfer file's weights: llama.cpp cannot open PWRI files)."""
    import sparserun

    from .gguf_file import GGUFFile
    from .model import default_threads
    from .sparsity import parse_sparsity

    hybrids = [hybrid_fraction(m) for m in modes if m.startswith("hybrid")]
    bad = [m for m in modes if m not in MODES and not m.startswith("hybrid")]
    if bad:
        raise SparserunError(f"unknown bench mode {bad[0]!r} (choose from {', '.join(MODES)}, hybrid:F)")
    if reps < 1 or n_prompt < 0 or n_gen < 0 or (n_prompt == 0 and n_gen == 0):
        raise SparserunError("bench needs -r >= 1 and at least one of -p / -n above 0")
    if depth < 0:
        raise SparserunError(f"bench depth (-d) must be 0 or more, got {depth}")
    if "llama.cpp" in modes and llama_cpp_model is None and GGUFFile(path).powerinfer:
        raise SparserunError(f"{path}: llama.cpp cannot open PowerInfer (PWRI) files: give the same weights as a plain "
                             "GGUF with --llama-cpp-model, or leave llama.cpp out of --modes")
    policies = [parse_sparsity(s) for s in sparsity] if "sparse" in modes else []
    threads = threads or default_threads()
    n_ctx = max(depth + n_prompt, depth + n_gen + 1, fidelity_tokens + 1) + 8
    runners = {}
    rss, fid, model = None, {}, None
    heads = [h for h in heads if h.strip().lower() != "dense"]
    if "dense" in modes or policies or heads:
        model = sparserun.load(path, threads=threads, n_ctx=n_ctx, sparsity="dense")
        n_vocab, bos = model.n_vocab, model.bos_id
        if "dense" in modes:
            runners["dense"] = SparserunRunner(model)
        for pol in policies:
            runners[f"sparse {pol.spec}"] = SparserunRunner(model, model.make_ffn(pol))
        for spec in heads:
            runners[f"head {spec}"] = SparserunRunner(model, head=model.set_head(spec))
            model.use_head(None)
            if progress:
                progress(0, 0, f"head {spec}: {runners[f'head {spec}'].head.describe()}")
    for frac in hybrids:  # each its own model: its weights and FFN live partly on the GPU
        from .hybrid import install, make_placement, resolve_device
        from .placement import device_bytes

        hm = sparserun.load(path, threads=threads, n_ctx=n_ctx, sparsity=sparsity[0])
        if resolve_device("cuda") == "cuda":
            install(hm, make_placement(hm, frac * device_bytes(hm) / 2**30))
        n_vocab, bos = hm.n_vocab, hm.bos_id
        name = f"hybrid {frac:g} {hm.policy.spec}"
        runners[name] = SparserunRunner(hm, hm.sparse)
        if progress:
            progress(0, 0, f"{name}: {hm.placement.summary()}")
    for r in runners.values():  # compile / page in before any timing
        r.pp(list(range(1, 9)))
        r.tg([max(bos, 0)], 2)
    if model is not None:
        rss = peak_rss()  # the engine's own memory, before the fidelity pass's logits of the whole text
        if (policies or heads) and fidelity_tokens > 0:
            ids = model.tokenize(text or DEFAULT_TEXT)[:fidelity_tokens]
            model.use_ffn(None)
            model.use_head(None)
            dense_logits = model.logits(ids)
            for name, r in runners.items():
                if r.ffn is not None or r.head is not None:
                    if trace is not None and not fid:  # the first such mode's pass, token by token
                        r.model.start_trace(trace, trace_ids, r.ffn.policy.spec if r.ffn is not None else "dense",
                                            f"hot:{len(r.head.hot)}" if r.head is not None else "dense")
                    try:
                        fid[name] = fidelity(r.model, r.ffn, ids, dense_logits, r.head)
                    finally:
                        r.model.stop_trace()
                    if progress:
                        progress(0, 0, f"fidelity {name}: top-1 {fid[name]['top1_agreement']:.3f}")
    if "llama.cpp" in modes:
        runners["llama.cpp"] = LlamaCppRunner(llama_cpp_model or path, threads, n_ctx)
        n_vocab, bos = runners["llama.cpp"].llm.n_vocab(), runners["llama.cpp"].llm.token_bos()
        runners["llama.cpp"].tg([max(bos, 0)], 2)
    bos = max(bos, 0)
    rng = np.random.default_rng(0)
    prompt = [int(t) for t in rng.integers(3, n_vocab, n_prompt)]
    context = [bos] + [int(t) for t in rng.integers(3, n_vocab, depth - 1)] if depth else []
    tests = ([("pp", n_prompt)] if n_prompt else []) + ([("tg", n_gen)] if n_gen else [])
    label = lambda test, n: f"{test}{n}" + (f" @ d{depth}" if depth else "")
    for name, runner in runners.items():  # each mode's depth context, computed once (untimed)
        if depth:
            if progress:
                progress(0, 0, f"{name}: {depth} tokens of context")
            runner.pp([], context)
    times = {(mode, test): [] for mode in runners for test, _ in tests}
    steps, done = reps * len(runners) * len(tests), 0
    for r in range(reps):
        for mode, runner in runners.items():
            for test, n in tests:
                dt = runner.pp(prompt, context) if test == "pp" else runner.tg(context or [bos], n)
                times[(mode, test)].append(n / dt)
                done += 1
                if progress:
                    progress(done, steps, f"rep {r + 1}/{reps} {mode} {label(test, n)}: {n / dt:.1f} t/s")
    import os

    rows = []
    for (mode, test), tps in times.items():
        n = dict(tests)[test]
        rows.append({"mode": mode, "test": label(test, n), "tokens_per_s": statistics.median(tps),
                     "sd": statistics.stdev(tps) if len(tps) > 1 else 0.0, "samples": tps})
    for row in rows:
        shares = getattr(runners[row["mode"]], "predictor_share", None)
        if shares and row["test"].startswith("tg"):
            row["predictor_share"] = statistics.median(shares)
        for ref_mode, key in (("llama.cpp", "vs_llama_cpp"), ("dense", "vs_dense")):
            ref = next((x for x in rows if x["mode"] == ref_mode and x["test"] == row["test"]), None)
            row[key] = row["tokens_per_s"] / ref["tokens_per_s"] if ref else None
    return {"model": str(path), "file_bytes": os.path.getsize(path), "threads": threads, "repetitions": reps,
            "depth": depth, "llama_cpp_model": str(llama_cpp_model) if llama_cpp_model and "llama.cpp" in modes else None,
            "peak_rss_bytes": rss, "rss_over_file": rss / os.path.getsize(path) if rss else None, "results": rows,
            "fidelity": fid}


def format_table(res, fmt="md"):
    if fmt == "json":
        return json.dumps(res, indent=2)
    head = ["mode", "model", "size", "threads", "test", "t/s", "vs dense", "vs llama.cpp"]
    name = res["model"].rsplit("/", 1)[-1]
    size = f"{res['file_bytes'] / 2**20:.1f} MiB"
    other = res.get("llama_cpp_model")  # llama.cpp ran the plain GGUF of a PWRI model's weights
    files = {m: (other.rsplit("/", 1)[-1], f"{os.path.getsize(other) / 2**20:.1f} MiB") if other and m == "llama.cpp"
             else (name, size) for m in {r["mode"] for r in res["results"]}}
    ratio = lambda x: f"{x:.2f}x" if x else ""
    body = [[r["mode"], *files[r["mode"]], str(res["threads"]), r["test"], f"{r['tokens_per_s']:.2f} ± {r['sd']:.2f}",
             ratio(r["vs_dense"]), ratio(r["vs_llama_cpp"])] for r in res["results"]]
    fhead = ["mode", "top-1 agreement", "mean KL", "ppl (dense)", "kept (mean)", "kept per layer"]
    fbody = [[m, f"{f['top1_agreement']:.3f}", f"{f['mean_kl']:.4f}", f"{f['ppl']:.3f} ({f['ppl_dense']:.3f})",
              f"{f['kept_mean']:.3f}", " ".join(f"{x:.2f}" for x in f["kept_per_layer"])]
             for m, f in res["fidelity"].items()]
    if fmt == "csv":
        rows = [head] + body + ([[], fhead] + fbody if fbody else [])
        return "\n".join(",".join(x.replace(",", ";") for x in row) for row in rows)
    out = _md(head, body)
    if fbody:
        out += f"\n\nfidelity against dense over {next(iter(res['fidelity'].values()))['tokens']} tokens:\n" + _md(fhead, fbody)
    for m, f in res["fidelity"].items():
        if "cold_argmax_share" in f:
            out += (f"\n\n{m}: the argmax was a cold row's at {100 * f['cold_argmax_share']:.1f}% of tokens; "
                    f"{f['cold_rows_computed']:.0f} cold rows computed exactly per token")
    shares = [f"{r['mode']}: {100 * r['predictor_share']:.1f}%" for r in res["results"] if r.get("predictor_share") is not None]
    if shares:
        out += "\n\npredictor time as a share of decode time: " + ", ".join(shares)
    if res["peak_rss_bytes"]:
        out += (f"\n\npeak RSS (sparserun, before the fidelity pass and llama.cpp): {res['peak_rss_bytes'] / 2**20:.0f} MiB = "
                f"{res['rss_over_file']:.2f}x the file")
    return out


def _md(head, body):
    w = [max(len(row[i]) for row in [head] + body) for i in range(len(head))]
    line = lambda row: "| " + " | ".join(c.ljust(w[i]) for i, c in enumerate(row)) + " |"
    return "\n".join([line(head), "|" + "|".join("-" * (x + 2) for x in w) + "|"] + [line(r) for r in body])
