"""The command line as a user runs it: info, generate, chat (piped), bench."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest


def run(*args, stdin=None, env=None):
    return subprocess.run([sys.executable, "-m", "sparserun.cli", *map(str, args)], capture_output=True, text=True,
                          input=stdin, timeout=600, env=dict(os.environ, **(env or {})))


def test_info(stories):
    r = run("info", stories, "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["architecture"] == "llama" and info["layers"] == 5 and info["vocab"] == 512
    assert info["activation"] == "silu (gated)" and info["quant_mix"]["F32"]["tensors"] == 48


def test_generate_greedy(stories):
    r = run("generate", stories, "-p", "Once upon a time", "-n", "24", "--temp", "0")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Once upon a time, there was a little girl named Lily.")
    assert "tok/s" in r.stderr


def test_chat_piped(stories):
    script = 'Once upon a time\n"""\nThere was\na dog\n"""\n/set temp 0\n/set top_p 7\n/reset\nLily\n/bye\nnever read\n'
    r = run("chat", stories, "-n", "12", "--seed", "1", stdin=script)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("generation:") == 3  # three answers, each with its timing line
    assert "[temperature = 0.0]" in r.stderr and "invalid value for top_p" in r.stderr
    assert "[conversation reset]" in r.stderr and "Traceback" not in r.stderr


def test_chat_context_full_is_a_message(stories):
    long = " ".join(["the dog ran to the park"] * 20)
    r = run("chat", stories, "--ctx", "64", "-n", "8", stdin=f"{long}\nhi\n")
    assert r.returncode == 0 and "context full" in r.stderr and r.stderr.count("generation:") == 1, r.stderr


def test_chat_uses_gguf_template(make_model):
    """A model with tokenizer.chat_template gets its prompt in that format (here llama-spm has none, so
    the template is added)."""
    from sparserun.chat import ChatSession
    import sparserun

    m = sparserun.load(make_model("F32", shape="tiny"))
    m.tokenizer.metadata["tokenizer.chat_template"] = (
        "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}")
    s = ChatSession(m, system="be brief")
    s.messages.append({"role": "user", "content": "hi"})
    ids, _ = s._prompt_ids()
    assert m.detokenize(ids).endswith("[system]be brief[user]hi[assistant]")


def test_bench_json(stories, tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSERUN_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "b.json"
    r = run("bench", stories, "-p", "16", "-n", "8", "-r", "2", "--sparsity", "topk:0.5", "--sparsity", "threshold:0",
            "--fidelity-tokens", "24", "--json", out)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    rows = {(x["mode"], x["test"]): x for x in res["results"]}
    modes = ["dense", "sparse topk:0.5", "sparse threshold:0", "llama.cpp"]
    assert set(rows) == {(m, t) for m in modes for t in ("pp16", "tg8")}
    assert all(x["tokens_per_s"] > 0 and len(x["samples"]) == 2 for x in rows.values())
    assert rows[("dense", "tg8")]["vs_llama_cpp"] > 0 and res["peak_rss_bytes"] > 0
    fid = res["fidelity"]
    assert fid["sparse threshold:0"]["top1_agreement"] == 1.0 and fid["sparse threshold:0"]["mean_kl"] < 1e-6
    assert abs(fid["sparse topk:0.5"]["kept_mean"] - 86 / 172) < 1e-6 and fid["sparse topk:0.5"]["mean_kl"] > 0
    assert "| dense" in r.stdout and "vs llama.cpp" in r.stdout and "top-1 agreement" in r.stdout


def test_bench_at_depth_keeps_each_modes_context(stories, tmp_path, monkeypatch):
    """-d D: every test runs after D tokens of context. Each runner keeps its own cache: another mode running in
    between leaves it intact, and a decode at depth continues the context exactly as a fresh model does."""
    import sparserun
    from sparserun.bench import LlamaCppRunner, SparserunRunner
    from sparserun.sparse_ffn import SparseFFN
    from sparserun.sparsity import parse_sparsity

    monkeypatch.setenv("SPARSERUN_CACHE", str(tmp_path / "cache"))
    m = sparserun.load(stories, threads=2, n_ctx=64)
    ctx = m.tokenize("Once upon a time, there was a little dog")
    dense, sparse = SparserunRunner(m), SparserunRunner(m, SparseFFN(m, parse_sparsity("topk:0.25")))
    dense.pp([], ctx)
    sparse.tg(ctx, 5)
    assert dense.kv.tokens == ctx and sparse.kv.tokens[:len(ctx)] == ctx and len(sparse.kv.tokens) == len(ctx) + 4
    dense.tg(ctx, 6)  # the kept context is reused: its tokens are the greedy continuation of ctx
    fresh = sparserun.load(stories, threads=2, n_ctx=64)
    out = list(ctx)
    for _ in range(5):
        out.append(int(np.argmax(fresh.eval(out)[-1])))
    assert m.cached[:len(ctx) + 5] == out
    np.testing.assert_allclose(m.eval(out)[-1], fresh.eval(out)[-1], rtol=1e-5, atol=1e-5)
    lc = LlamaCppRunner(stories, 2, 64)
    lc.tg(ctx, 5)
    lc.tg(ctx, 5)  # cut back to ctx, then the same greedy tokens again
    assert [int(t) for t in lc.llm.input_ids[:lc.llm.n_tokens]] == out[:len(ctx) + 5]

    out_json = tmp_path / "d.json"
    r = run("bench", stories, "-p", "8", "-n", "4", "-d", "40", "-r", "2", "--modes", "dense,llama.cpp",
            "--json", out_json)
    assert r.returncode == 0, r.stderr
    res = json.loads(out_json.read_text())
    assert res["depth"] == 40 and {x["test"] for x in res["results"]} == {"pp8 @ d40", "tg4 @ d40"}
    assert "tg4 @ d40" in r.stdout


def test_generate_with_sparsity(stories, tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSERUN_CACHE", str(tmp_path / "cache"))
    r = run("generate", stories, "-p", "Once upon a time", "-n", "16", "--temp", "0", "--sparsity", "threshold:0")
    assert r.returncode == 0 and r.stdout.startswith("Once upon a time, there was a little girl named Lily."), r.stderr


def test_cache_list_clear_and_size_cap(stories, make_model, tmp_path, monkeypatch):
    """Each model's packs are one cache entry (listed with its model and size); clear removes one or all; past
    $SPARSERUN_CACHE_MAX the least recently used other entries are evicted, never the one in use."""
    import sparserun
    from sparserun import cache

    env = {"SPARSERUN_CACHE": str(tmp_path / "c")}
    monkeypatch.setenv("SPARSERUN_CACHE", env["SPARSERUN_CACHE"])
    other = make_model("F32", shape="tiny")
    sparserun.load(stories, sparsity="topk:0.5")
    sparserun.load(other, sparsity="topk:0.5")
    es = cache.entries()
    assert [e["model"] for e in es] == [str(other.resolve()), str(stories.resolve())] and all(e["bytes"] for e in es)
    r = run("cache", env=env)
    assert r.returncode == 0 and "2 models" in r.stdout and str(stories.resolve()) in r.stdout, r.stdout
    # a cap below both entries: loading the storyteller's again evicts the other model's, keeps its own
    monkeypatch.setenv("SPARSERUN_CACHE_MAX", "1K")
    sparserun.load(stories, sparsity="topk:0.5")
    assert [e["model"] for e in cache.entries()] == [str(stories.resolve())]
    r = run("cache", "clear", "--model", stories, env=env)
    assert r.returncode == 0 and "removed 1 entry" in r.stdout and cache.entries() == []
    assert run("cache", "clear", env=env).returncode == 2
    monkeypatch.setenv("SPARSERUN_CACHE_MAX", "lots")
    with pytest.raises(sparserun.SparserunError, match="not a size"):
        sparserun.load(stories, sparsity="topk:0.5")
