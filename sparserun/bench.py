"""`sparserun bench`: tokens/s of this engine against llama.cpp (llama-cpp-python) on the same file.

Like llama-bench: a prompt-processing test (pp N: N random tokens in one fresh context) and a decode
test (tg N: N tokens one at a time after a BOS). Repetitions are interleaved across modes (rep 1 of
every mode, then rep 2, ...) so all modes see the same machine state; each figure is a median with
its standard deviation. Peak RSS of this engine is read before llama.cpp is loaded.
"""
import json
import resource
import statistics
import sys
import time

import numpy as np

from .errors import SparserunError

MODES = ("dense", "llama.cpp")


class SparserunRunner:
    name = "dense"

    def __init__(self, path, threads, n_ctx):
        import sparserun

        self.model = sparserun.load(path, threads=threads, n_ctx=n_ctx)

    def pp(self, ids):
        self.model.reset()
        t = time.perf_counter()
        self.model.eval(ids)
        return time.perf_counter() - t

    def tg(self, bos, n):
        self.model.reset()
        self.model.eval([bos])
        ctx = [bos]
        t = time.perf_counter()
        for _ in range(n):
            ctx.append(int(np.argmax(self.model.eval(ctx)[-1])))
        return time.perf_counter() - t


class LlamaCppRunner:
    name = "llama.cpp"

    def __init__(self, path, threads, n_ctx):
        import llama_cpp

        from .tokenizer import quiet_stderr

        with quiet_stderr():
            self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                                       n_batch=512, verbose=False)

    def pp(self, ids):
        self.llm.reset()
        t = time.perf_counter()
        self.llm.eval(ids)
        return time.perf_counter() - t

    def tg(self, bos, n):
        self.llm.reset()
        self.llm.eval([bos])
        t = time.perf_counter()
        for _ in range(n):
            self.llm.eval([int(np.argmax(self.llm.scores[self.llm.n_tokens - 1]))])
        return time.perf_counter() - t


def peak_rss():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run_bench(path, modes=MODES, n_prompt=64, n_gen=32, reps=3, threads=None, progress=None):
    """Returns a dict: model facts and one row per (mode, test) with t/s median and sd."""
    from .model import default_threads

    bad = [m for m in modes if m not in MODES]
    if bad:
        raise SparserunError(f"unknown bench mode {bad[0]!r} (choose from {', '.join(MODES)})")
    if reps < 1 or n_prompt < 0 or n_gen < 0 or (n_prompt == 0 and n_gen == 0):
        raise SparserunError("bench needs -r >= 1 and at least one of -p / -n above 0")
    threads = threads or default_threads()
    n_ctx = max(n_prompt, n_gen + 1) + 8
    runners = {}
    rss = None
    if "dense" in modes:
        runners["dense"] = SparserunRunner(path, threads, n_ctx)
        m = runners["dense"].model
        n_vocab, bos = m.n_vocab, m.tokenizer.bos_id
        runners["dense"].pp(list(range(1, 9)))  # compile / page in before any timing
        runners["dense"].tg(max(bos, 0), 2)
        rss = peak_rss()
    if "llama.cpp" in modes:
        runners["llama.cpp"] = LlamaCppRunner(path, threads, n_ctx)
        n_vocab, bos = runners["llama.cpp"].llm.n_vocab(), runners["llama.cpp"].llm.token_bos()
        runners["llama.cpp"].tg(max(bos, 0), 2)
    bos = max(bos, 0)
    rng = np.random.default_rng(0)
    prompt = [int(t) for t in rng.integers(3, n_vocab, n_prompt)]
    tests = ([("pp", n_prompt)] if n_prompt else []) + ([("tg", n_gen)] if n_gen else [])
    times = {(mode, test): [] for mode in runners for test, _ in tests}
    steps, done = reps * len(runners) * len(tests), 0
    for r in range(reps):
        for mode, runner in runners.items():
            for test, n in tests:
                dt = runner.pp(prompt) if test == "pp" else runner.tg(bos, n)
                times[(mode, test)].append(n / dt)
                done += 1
                if progress:
                    progress(done, steps, f"rep {r + 1}/{reps} {mode} {test}{n}: {n / dt:.1f} t/s")
    import os

    rows = []
    for (mode, test), tps in times.items():
        n = dict(tests)[test]
        rows.append({"mode": mode, "test": f"{test}{n}", "tokens_per_s": statistics.median(tps),
                     "sd": statistics.stdev(tps) if len(tps) > 1 else 0.0, "samples": tps})
    for row in rows:
        ref = next((x for x in rows if x["mode"] == "llama.cpp" and x["test"] == row["test"]), None)
        row["vs_llama_cpp"] = row["tokens_per_s"] / ref["tokens_per_s"] if ref else None
    return {"model": str(path), "file_bytes": os.path.getsize(path), "threads": threads, "repetitions": reps,
            "peak_rss_bytes": rss, "rss_over_file": rss / os.path.getsize(path) if rss else None, "results": rows}


def format_table(res, fmt="md"):
    head = ["mode", "model", "size", "threads", "test", "t/s", "vs llama.cpp"]
    name = res["model"].rsplit("/", 1)[-1]
    size = f"{res['file_bytes'] / 2**20:.1f} MiB"
    body = [[r["mode"], name, size, str(res["threads"]), r["test"], f"{r['tokens_per_s']:.2f} ± {r['sd']:.2f}",
             f"{r['vs_llama_cpp']:.2f}x" if r["vs_llama_cpp"] else ""] for r in res["results"]]
    if fmt == "csv":
        return "\n".join(",".join(x.replace(",", ";") for x in row) for row in [head] + body)
    if fmt == "json":
        return json.dumps(res, indent=2)
    w = [max(len(row[i]) for row in [head] + body) for i in range(len(head))]
    line = lambda row: "| " + " | ".join(c.ljust(w[i]) for i, c in enumerate(row)) + " |"
    out = [line(head), "|" + "|".join("-" * (x + 2) for x in w) + "|"] + [line(r) for r in body]
    if res["peak_rss_bytes"]:
        out.append(f"\npeak RSS (sparserun, before llama.cpp loads): {res['peak_rss_bytes'] / 2**20:.0f} MiB = "
                   f"{res['rss_over_file']:.2f}x the file")
    return "\n".join(out)


def stderr_progress(done, total, text):
    sys.stderr.write(f"\r[{done}/{total}] {text}".ljust(70) + ("\n" if done == total else ""))
    sys.stderr.flush()
