"""Neuron hotness profiles: what they record, their file, and the thresholds derived from them."""
import subprocess
import sys

import numpy as np
import pytest

import sparserun
from sparserun.errors import SparserunError
from sparserun.profile import load_profile, profile_model, save_profile

TEXT = ("Once upon a time, there was a little boy named Tim. Tim loved to play with his red ball in the big park. "
        "One day, Tim saw a small dog. The dog was sad because it was lost. Tim said, \"Do not be sad, little dog. "
        "I will help you find your home.\" They walked and walked until they saw a big house. A girl ran out and "
        "hugged the dog. \"Thank you, Tim!\" she said. Tim was happy. He had made a new friend.")


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSERUN_CACHE", str(tmp_path / "cache"))


def test_relu_profile_matches_the_sparse_ffn_and_is_skewed(make_model):
    path = make_model("F32", shape="small", planted=0.9)
    m = sparserun.load(path)
    ids = m.tokenize(TEXT)
    p = profile_model(m, ids)
    assert p.tokens == len(ids) and not p.thresholds.any()  # ReLU: active = non-zero, one pass
    sm = sparserun.load(path, sparsity="threshold:0")
    sm.logits(ids)  # the same tokens, in one fresh context like the profile's pass
    kept = sm.sparse.kept_fraction()
    np.testing.assert_allclose(p.frequency.mean(1), kept, atol=1e-6)
    for row in p.summary():
        assert 0.8 < row["sparsity"] < 0.97  # planted ~90% zeros
        assert row["neurons_for_80pct"] < 0.4  # power-law hotness: a minority of neurons does most of the work
    assert (p.histogram[:, 0] > 0).all()  # exact zeros counted


def test_swiglu_thresholds_from_histogram_match_quantiles(stories):
    from sparserun.calibrate import calibrate_thresholds

    m = sparserun.load(stories)
    ids = m.tokenize(TEXT)
    p = profile_model(m, ids, target_sparsity=0.5)
    direct = calibrate_thresholds(m, ids, 0.5)
    np.testing.assert_allclose(p.threshold_for(0.5), direct, rtol=0.03)
    np.testing.assert_allclose(p.thresholds, direct, rtol=0.03)
    assert np.abs(np.array([r["sparsity"] for r in p.summary()]) - 0.5).max() < 0.02  # active = above them
    assert all(a < b for a, b in zip(p.threshold_for(0.3), p.threshold_for(0.7)))


def test_profile_file_round_trip_and_refusals(stories, make_model, tmp_path):
    m = sparserun.load(stories)
    p = profile_model(m, m.tokenize(TEXT))
    f = tmp_path / "p.gguf"
    save_profile(p, f)
    q = load_profile(f, m)
    for name in ("frequency", "mean_magnitude", "histogram", "thresholds"):
        np.testing.assert_array_equal(getattr(q, name), getattr(p, name).astype(getattr(q, name).dtype))
    assert q.tokens == p.tokens and q.fingerprint == m.gguf.fingerprint()
    other = sparserun.load(make_model("F32", shape="tiny"))
    with pytest.raises(SparserunError, match="made for another model"):
        load_profile(f, other)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(f.read_bytes()[:200])
    with pytest.raises(SparserunError, match="not a valid sparserun profile"):
        load_profile(bad)
    with pytest.raises(SparserunError, match="not a valid sparserun profile"):
        load_profile(stories)  # a model, not a profile
    with pytest.raises(SparserunError, match="no such profile"):
        load_profile(tmp_path / "missing.gguf")


def test_profile_and_calibrate_cli(stories, tmp_path):
    corpus, prof, th = tmp_path / "c.txt", tmp_path / "p.gguf", tmp_path / "t.json"
    corpus.write_text(TEXT)
    run = lambda *a: subprocess.run([sys.executable, "-m", "sparserun.cli", *map(str, a)], capture_output=True,
                                    text=True, timeout=300)
    r = run("profile", stories, "--corpus", corpus, "-o", prof)
    assert r.returncode == 0, r.stderr
    assert "neurons covering 80%" in r.stdout and prof.exists() and "tok/s" in r.stderr
    r = run("calibrate", stories, "--profile", prof, "--target-sparsity", "0.4", "-o", th)
    assert r.returncode == 0, r.stderr
    from sparserun.sparsity import parse_sparsity

    assert len(parse_sparsity(f"threshold:{th}").values) == 5
    r = run("calibrate", stories, "-o", th)
    assert r.returncode == 2 and "exactly one of --corpus or --profile" in r.stderr
    r = run("profile", stories, "--corpus", tmp_path / "nope.txt")
    assert r.returncode == 2 and "no such corpus file" in r.stderr


def test_profile_plot(stories, tmp_path):
    m = sparserun.load(stories)
    p = profile_model(m, m.tokenize(TEXT))
    from sparserun.profile import plot_profile

    out = tmp_path / "hot.png"
    plot_profile(p, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
