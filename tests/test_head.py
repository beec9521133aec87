"""The hot/cold output head (--head hot[:K]): exact where it says it is, cached per model, measured as a mode."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import sparserun
from sparserun.errors import SparserunError
from sparserun.head import fit_estimate, parse_head

TEXT = "Once upon a time there was a little girl named Lily. She loved to play outside in the sun with her dog."


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSERUN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_whole_vocabulary_hot_is_the_dense_head(stories, cache):
    m = sparserun.load(stories)
    ids = m.tokenize(TEXT)
    dense = m.logits(ids)
    m.set_head(f"hot:{m.n_vocab}")
    assert np.array_equal(m.logits(ids), dense)


def test_hot_rows_exact_cold_rows_estimated(stories, cache):
    from sparserun.head import HotHead

    m = sparserun.load(stories)
    ids = m.tokenize(TEXT)
    dense = m.logits(ids)
    head = HotHead(m, 96, top=32)
    head.last_estimates = np.empty(0)  # keep them
    m.use_head(head)
    got = m.logits(ids)
    assert len(head.hot) == 96 and len(head.cold) == m.n_vocab - 96
    np.testing.assert_array_equal(got[:, head.hot], dense[:, head.hot])  # the same kernel on the same rows
    # the rows computed exactly for each position: its context's cold tokens, and (the last position's estimates are
    # the head's) the 32 cold rows of the largest estimates
    for t in range(len(ids)):
        ctx_cold = [i for i in set(ids[:t + 1]) if head.is_cold[i]]
        np.testing.assert_allclose(got[t, ctx_cold], dense[t, ctx_cold], rtol=1e-4, atol=1e-4)
    top = head.cold[np.argsort(-head.last_estimates[head.cold])[:32]]
    np.testing.assert_allclose(got[-1, top], dense[-1, top], rtol=1e-4, atol=1e-4)
    # rank 64 = the model's width: the estimate is the row itself up to 4-bit rounding (a scale per 32 values, and
    # the basis coordinates in int8): within a tenth of the logits' range
    err = np.abs(got - dense)[:, head.cold].max()
    assert 0 < err < 0.1 * np.abs(dense).max()
    assert (got.argmax(1) == dense.argmax(1)).all()
    assert head.rows == len(ids) and head.computed >= head.top * len(ids)


def test_estimate_fits_the_rows(stories):
    """Without hidden states the estimate is the cold rows' principal projection: at full rank it reproduces them."""
    m = sparserun.load(stories)
    w = m.output
    cold = np.arange(100, 300)
    p, a = fit_estimate(w, cold, w.cols)
    assert a.shape == (w.rows, w.cols)  # given for every row
    a = a[cold]
    rows = w.rows_f32(cold)
    x = np.random.default_rng(0).standard_normal(w.cols).astype(np.float32)
    np.testing.assert_allclose(a @ (p @ x), rows @ x, atol=1e-4 * np.abs(rows @ x).max())
    cov = np.cov(np.random.default_rng(1).standard_normal((500, w.cols)).T)
    p2, a2 = fit_estimate(w, cold, w.cols, cov)  # with hidden states: still exact at full rank
    a2 = a2[cold]
    np.testing.assert_allclose(a2 @ (p2 @ x), rows @ x, atol=1e-4 * np.abs(rows @ x).max())


def test_estimate_kernel_is_the_q4_0_dot():
    """The rows' estimate in the kernel (8-row tiles) equals A's Q4_0 rows dotted in float with the basis coordinates'
    int8 rounding (exact in integers: float tolerance only), on the VNNI route where there is one and on the generic
    one; a vocabulary that is not a whole number of tiles ends in a partial one; tiles left out (those of hot rows
    only) leave their rows as they were."""
    from gguf import GGMLQuantizationType, quants

    from sparserun.head import quantize_estimate
    from sparserun.kernels import head as KH
    from sparserun.kernels import quant as K

    rng = np.random.default_rng(2)
    n = 1003  # not a whole number of tiles
    a = rng.standard_normal((n, 128)).astype(np.float32)
    codes = quantize_estimate(a)
    assert codes.shape == (n, 4 * 18)
    tiles = KH.tile_q4_0(codes)
    assert tiles.shape == (126, 4 * 18 * 8)
    z = rng.standard_normal((1, 128)).astype(np.float32)
    _, zd, z8, zb, _, _ = K.acts_forms(z)
    deq = quants.dequantize(codes, GGMLQuantizationType.Q4_0)  # (n, 128)
    want = deq @ (z8[0].astype(np.float32).reshape(4, 32) * zd[0][:, None]).reshape(-1)
    bias = zb.reshape(4, 8).sum(1, dtype=np.int32)
    some = np.array([0, 3, 125])  # tiles of rows 0-7, 24-31 and the partial last one, 1000-1002
    rows = np.concatenate([np.arange(0, 8), np.arange(24, 32), np.arange(1000, 1003)])
    for vnni in sorted({False, K.HAS_VNNI}):
        logits = np.full(n, np.nan, np.float32)
        KH.estimate(tiles, np.arange(len(tiles)), 4, vnni, z8[0], zd[0], bias, logits)
        np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-4)
        logits[:] = np.nan
        KH.estimate(np.ascontiguousarray(tiles[some]), some, 4, vnni, z8[0], zd[0], bias, logits)
        np.testing.assert_allclose(logits[rows], want[rows], rtol=1e-5, atol=1e-4)
        assert np.isnan(np.delete(logits, rows)).all()  # the other tiles' rows untouched


def test_cached_estimate_is_reused_and_bound_to_its_model(stories, cache):
    m = sparserun.load(stories)
    m.set_head("hot:128")
    files = list(cache.rglob("head.r*.npz"))
    assert len(files) == 1
    stamp = files[0].stat().st_mtime_ns
    m.set_head("hot:128")  # the same hot set: read back, not fitted again
    assert files[0].stat().st_mtime_ns == stamp
    with np.load(files[0]) as z:
        data = dict(z)
    data["fingerprint"] = np.array("0" * 64)
    np.savez(files[0], **data)
    with pytest.raises(SparserunError, match="made for another model"):
        m.set_head("hot:128")


def test_profile_gives_the_hot_set_and_the_estimate_basis(stories, cache, tmp_path):
    from sparserun.profile import load_profile, profile_model, save_profile

    m = sparserun.load(stories)
    ids = m.tokenize(TEXT * 8)
    prof = profile_model(m, ids)
    assert prof.token_frequency.shape == (m.n_vocab,) and prof.head_covariance.shape == (m.args.dim, m.args.dim)
    assert prof.token_frequency[ids].min() > 0
    path = tmp_path / "p.gguf"
    save_profile(prof, path)
    back = load_profile(path, m)
    np.testing.assert_array_equal(back.token_frequency, prof.token_frequency)
    head = m.set_head("hot:64", path)
    assert head.calibrated
    freq = prof.token_frequency
    assert freq[head.hot].min() >= np.sort(freq)[-64]  # the 64 most frequent tokens are the hot set


@pytest.mark.parametrize("spec,words", [("hot:0", "between 1"), ("hot:x", "not a count"), ("cold", "unknown head"),
                                        ("hot:100000", "between 1")])
def test_bad_head_specs(spec, words):
    with pytest.raises(SparserunError, match=words):
        parse_head(spec, 512)
    assert parse_head("dense", 512) is None and parse_head("hot:0.25", 512) == 128


def test_cli_head_option(stories, cache):
    env = {**os.environ, "SPARSERUN_CACHE": str(cache)}
    r = subprocess.run([sys.executable, "-m", "sparserun.cli", "generate", str(stories), "-p", "Once", "-n", "8",
                        "--temp", "0", "--head", "hot:200"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert "hot head: 200 of 512 rows" in r.stderr
    bad = subprocess.run([sys.executable, "-m", "sparserun.cli", "generate", str(stories), "--head", "hot:0"],
                         capture_output=True, text=True, env=env)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "--head" in bad.stderr


def test_bench_reports_the_head_mode(stories, cache, tmp_path):
    out = tmp_path / "b.json"
    r = subprocess.run([sys.executable, "-m", "sparserun.cli", "bench", str(stories), "-p", "8", "-n", "8", "-r", "2",
                        "--modes", "dense", "--head", "hot:128", "--fidelity-tokens", "24", "--json", str(out)],
                       capture_output=True, text=True, env={**os.environ, "SPARSERUN_CACHE": str(cache)})
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert {x["mode"] for x in res["results"]} == {"dense", "head hot:128"}
    f = res["fidelity"]["head hot:128"]
    assert f["top1_agreement"] > 0.9 and 0 <= f["cold_argmax_share"] <= 1 and f["cold_rows_computed"] >= 256
    assert f["ppl"] > 0 and f["ppl_dense"] > 0 and "argmax was a cold row's" in r.stdout


def test_without_a_profile_the_statistics_come_from_the_builtin_text(stories, cache, capsys):
    """No profile: the hot set and the estimate's basis come from one dense pass over Python's documentation text,
    said once on stderr and cached beside the packs (read back, not recomputed); the counts are the text's tokens and
    the model's argmax, as a profile's."""
    from sparserun.head import STATS_TOKENS, builtin_statistics, frequency_order
    from sparserun.teal import builtin_text

    m = sparserun.load(stories)
    head = m.set_head("hot:64")
    err = capsys.readouterr().err
    assert "Python's documentation text" in err and "head.stats.npz" in err
    assert head.calibrated and "documentation" in head.describe()
    (stats,) = cache.rglob("head.stats.npz")
    stamp = stats.stat().st_mtime_ns
    freq, cov = builtin_statistics(m)
    assert stats.stat().st_mtime_ns == stamp and "documentation" not in capsys.readouterr().err
    ids = m.tokenize(builtin_text())[:STATS_TOKENS]
    assert np.isclose(freq.sum(), 1.0, atol=1e-4) and (freq[np.unique(ids)] >= 0.5 / len(ids) - 1e-7).all()
    assert np.allclose(cov, cov.T, atol=1e-5) and np.linalg.eigvalsh(cov.astype(np.float64)).min() > -1e-4
    np.testing.assert_array_equal(head.hot, np.sort(frequency_order(freq)[:64]))
    assert m.logits(m.tokenize(TEXT)).shape[1] == m.n_vocab  # the model still runs after the pass
