"""`sparserun perplexity`: llama-perplexity's chunks and scoring, equal to llama.cpp's on the dense path."""
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import sparserun
from sparserun.errors import SparserunError
from sparserun.perplexity import chunk_nll, chunk_tokens, llama_cpp_perplexity, model_perplexity, summary

TEXT = ("Once upon a time there was a little girl named Lily. She loved to play outside in the sun with her dog. "
        "One day she found a big red ball in the park and ran home to show her mom. ") * 12


def test_chunks_and_scoring():
    ids = list(range(10, 110))
    parts = chunk_tokens(ids, 32, bos=1)
    assert len(parts) == 3 and all(len(p) == 32 and p[0] == 1 for p in parts) and parts[1][1:] == ids[33:64]
    assert len(chunk_tokens(ids, 32, n_chunks=2)) == 2
    with pytest.raises(SparserunError, match="fewer than one chunk"):
        chunk_tokens(ids, 128)
    logits = np.zeros((32, 8), np.float32)  # uniform: every scored token costs log 8
    nll = chunk_nll(logits, [0] * 32)
    assert len(nll) == 15 and np.allclose(nll, math.log(8))
    ppl, err = summary([1.0, 2.0, 3.0])
    assert ppl == pytest.approx(math.exp(2.0)) and err == pytest.approx(math.exp(2.0) * 1.0 / math.sqrt(3))


def test_dense_perplexity_equals_llama_cpp(stories):
    m = sparserun.load(stories, n_ctx=128)
    parts = chunk_tokens(m.tokenize(TEXT, special=False), 128, 3, m.tokenizer.bos_id)
    ours = model_perplexity(m, parts)
    ref = llama_cpp_perplexity(stories, parts, 2)
    assert len(ours) == len(ref) == 3 * 63
    np.testing.assert_allclose(ours, ref, atol=0.02)  # F32 weights, f16 KV caches on both sides: float rounding
    assert summary(ours)[0] == pytest.approx(summary(ref)[0], rel=2e-3)


def test_cli(stories, tmp_path):
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    env = {**os.environ, "SPARSERUN_CACHE": str(tmp_path / "cache")}
    run = lambda *a: subprocess.run([sys.executable, "-m", "sparserun.cli", "perplexity", str(stories), "-f", str(text),  # noqa: E731
                                     "--ctx", "128", *a], capture_output=True, text=True, env=env)
    r = run("--llama-cpp")
    assert r.returncode == 0, r.stderr
    assert re.search(r"\[1\][\d.]+,\[2\][\d.]+,", r.stdout)
    ppl = float(re.search(r"Final estimate: PPL = ([\d.]+) \+/- [\d.]+", r.stdout).group(1))
    ref = float(re.search(r"llama.cpp: PPL = ([\d.]+)", r.stdout).group(1))
    assert ppl == pytest.approx(ref, rel=1e-3) and 1 < ppl < 512
    sparse = run("--sparsity", "topk:0.25", "--head", "hot:128")  # a policy and a head cost perplexity, measured
    assert sparse.returncode == 0, sparse.stderr
    assert float(re.search(r"PPL = ([\d.]+)", sparse.stdout).group(1)) != ppl
    bad = run("--ctx", "8")
    assert bad.returncode == 2 and "at least 16" in bad.stderr
