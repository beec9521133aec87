"""Input sparsity on every matrix (teal.py): the column kernel against numpy, every channel kept gives the dense
logits, decode columns against the masked dense path, calibration meets its target, files bound to their model, specs
and composition."""
import subprocess
import sys

import numpy as np
import pytest

import sparserun
from sparserun import teal
from sparserun.errors import SparserunError
from sparserun.kernels import quant as K
from sparserun.kernels import sparse as S
from sparserun.sparsity import Threshold, parse_sparsity


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSERUN_CACHE", str(tmp_path / "cache"))


def _columns(pack):
    """A column pack's units as float32 (n_in, n_out), decoded in numpy."""
    nbo = pack.n_out // K.QK
    u = pack.units.reshape(pack.n_in, pack.stride)
    if pack.kind == teal.EXACT_Q4:  # the source's nibbles; s and m per block of 32 channels and output
        q = u[:, :pack.n_out // 2].reshape(pack.n_in, nbo, 16)
        vals = np.concatenate([q & 15, q >> 4], axis=2).reshape(pack.n_in, pack.n_out).astype(np.float32) - 8
        s = pack.sc.view(np.float16).reshape(-1, pack.n_out).astype(np.float32).repeat(K.QK, axis=0)
        m = pack.mn.view(np.float16).reshape(-1, pack.n_out).astype(np.float32).repeat(K.QK, axis=0)
        return s * vals - (m if pack.has_m else 0)
    if pack.kind == S.DOWN_F32:
        return u[:, :4 * pack.n_out].copy().view(np.float32)
    qb = 16 if pack.kind == S.DOWN_Q4 else 32
    scales = u[:, nbo * qb:nbo * qb + 2 * nbo].copy().view(np.float16).astype(np.float32)  # (n_in, nbo)
    q = u[:, :nbo * qb].reshape(pack.n_in, nbo, qb)
    if pack.kind == S.DOWN_Q4:  # Q4_0's order: value i in the low nibble of byte i, value i + 16 in its high nibble
        vals = np.concatenate([q & 15, q >> 4], axis=2).astype(np.float32) - 8
    else:
        vals = q.view(np.int8).astype(np.float32)
    return (vals * scales[:, :, None]).reshape(pack.n_in, pack.n_out)


def _decode(m, ids):
    """Logits of each position of ids, one decode token at a time after the first."""
    m.reset()
    out = [m.eval(ids[:1])[-1]]
    for i in range(1, len(ids)):
        out.append(m.eval(ids[:i + 1])[-1])
    return np.array(out)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q8_0", "Q4_K_M"])
def test_column_kernel_matches_numpy(make_model, tmp_path, qtype):
    """The column pack of q|k|v and of down: the kept channels (|x| > t) and the sum of their columns equal numpy's over
    the pack's own columns, up to the int8 coefficients' rounding, for a decode token and a prompt batch; the columns
    equal the file's matrices (exact 4-bit columns: the source's nibbles, fp16 scales) or stay close (int8
    re-quantized), the error the column path adds against the dense one."""
    m = sparserun.load(make_model(qtype, shape="small"))
    rng = np.random.default_rng(3)
    kinds = set()
    for li in range(m.args.n_layer):
        for group in (teal.QKV, teal.DOWN):
            ws = teal._group_weights(m, li, group)
            packs = teal.ColumnPack.for_group(ws, str(tmp_path), li, group)
            x = rng.standard_normal(ws[0].cols).astype(np.float32)
            t = np.float32(np.quantile(np.abs(x), 0.6))
            keep = np.abs(x) > t
            got, at = [], 0
            full = np.concatenate([w.dequantize() for w in ws]).T  # (n_in, n_out of the group)
            for pack in packs:
                kinds.add(pack.kind)
                cols = _columns(pack)
                exact = full[:, at:at + pack.n_out]  # this run's matrices
                at += pack.n_out
                err = np.linalg.norm(cols - exact) / np.linalg.norm(exact)
                assert err < (2e-3 if pack.kind == teal.EXACT_Q4 else 0.01), err  # fp16 scales; int8 re-quantized
                idx, coef = np.empty(pack.n_in, np.int64), np.empty(pack.n_in, np.float32)
                outs, n = pack.run(x, t, idx, coef)
                assert n == keep.sum() and sorted(idx[:n]) == list(np.flatnonzero(keep))
                want = x[keep] @ cols[keep]
                np.testing.assert_allclose(np.concatenate([o[0] for o in outs]), want, atol=0.02 * np.abs(want).max())
                got += [o.shape[1] for o in outs]
                # a prompt batch (column_matmul): every token its own kept channels, the first (BOS) all of them
                xb = rng.standard_normal((11, ws[0].cols)).astype(np.float32)
                xb[3, :9] = 0.0  # a group of channels a token drops entirely
                keep_b = np.abs(xb) > t
                keep_b[0] = True
                outs, counts = pack.run_batch(xb, t, 1)
                assert list(counts) == list(keep_b.sum(1))
                want = (xb * keep_b) @ cols
                got_b = np.concatenate(outs, axis=1)
                assert all(o.flags.c_contiguous for o in outs)
                np.testing.assert_allclose(got_b, want, atol=0.02 * np.abs(want).max())
            assert got == [w.rows for w in ws]
    # Q4_0 and Q4_K matrices give exact 4-bit columns (their own nibbles and scales), the others int8 columns
    assert kinds == {"Q4_0": {teal.EXACT_Q4}, "Q8_0": {S.DOWN_Q8}, "Q4_K_M": {teal.EXACT_Q4, S.DOWN_Q8}}[qtype]


@pytest.mark.skipif(not __import__("sparserun.kernels.simd.ir", fromlist=["X86_AVX2"]).X86_AVX2, reason="an x86 AVX2 host")
def test_exact_column_axpy_avx2_form_sums_what_the_portable_form_does(monkeypatch):
    """The exact 4-bit column axpy's AVX2 form (channel pairs through pmaddubsw, no transpose) gives the portable
    form's result bit for bit (the same int32 sums, the same float steps): 1 to 32 channels, an even and an odd number
    of output blocks, with and without Q4_K's offsets; and both equal numpy's sum of the columns on the int8
    coefficients."""
    from numba import njit

    from sparserun.kernels.simd import axpy

    def run(acc, u, offs, nq, cw, cz, a, sc, soff, mn, moff, xs, nb, pf):
        axpy.axpy_q4_exact_generic(acc, u, offs, nq, cw, cz, a, sc, soff, mn, moff, xs, nb, pf)

    avx2 = njit(run)
    rng = np.random.default_rng(11)
    results = []
    for n, nb, with_m in [(1, 3, False), (7, 4, True), (16, 5, True), (23, 2, False), (32, 7, True)]:
        n_out = 32 * nb
        u = rng.integers(0, 256, (40, n_out // 2), dtype=np.uint8)
        ch = rng.choice(40, n, replace=False)
        q = np.zeros(32, np.int64)
        q[:n] = rng.integers(-127, 128, n)
        nq = (n + 3) // 4
        offs = np.array([ch[g] if g < n else ch[0] for g in range(32)], np.int64) * (n_out // 2)
        cw = (q.reshape(8, 4) & 255).astype(np.uint32) @ (1 << (8 * np.arange(4, dtype=np.uint32)))
        sc = rng.standard_normal(n_out).astype(np.float16).view(np.uint8)
        mn = rng.standard_normal(n_out).astype(np.float16).view(np.uint8)
        pf = np.full(32, -1, np.int64)
        pf[:3] = offs[:3]
        args = (u.reshape(-1), offs, nq, cw.astype(np.uint32).view(np.int32), np.int32(-8 * q.sum()), np.float32(0.01),
                sc, 0, mn, 0 if with_m else -1, np.float32(0.5), nb, pf)
        acc = rng.standard_normal(n_out).astype(np.float32)
        got = acc.copy()
        avx2(got, *args)
        vals = np.stack([np.concatenate([u[c].reshape(nb, 16) & 15, u[c].reshape(nb, 16) >> 4], axis=1).reshape(-1)
                         for c in ch]).astype(np.int64) - 8  # (n, n_out): Q4_0's nibble order per block of 32
        ints = q[:n] @ vals
        want = acc + 0.01 * sc.view(np.float16).astype(np.float32) * ints - (
            mn.view(np.float16).astype(np.float32) * 0.5 if with_m else 0)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-3)
        results.append((acc, args, got))
    monkeypatch.setattr(axpy, "X86_AVX2", False)  # read at code generation: the portable form
    portable = njit(run)
    for acc, args, got in results:
        out = acc.copy()
        portable(out, *args)
        np.testing.assert_array_equal(out, got)


def test_every_channel_kept_gives_the_dense_logits(stories):
    """Thresholds of -1 keep every channel: the masked dense path gives the dense logits bit for bit, and the column
    packs (float32 columns of an F32 model: no re-quantization), for prompt batches and decode tokens, agree with it
    to float rounding."""
    m = sparserun.load(stories, kv_type="f32")
    ids = m.tokenize("Once upon a time, there was a little dog named Max. He liked to run")
    dense_batch = m.logits(ids)
    dense = _decode(m, ids)
    keep_all = np.full((m.args.n_layer, 4), -1.0)
    m.use_ffn(teal.TealFFN(m, None, teal.InputSparsity(m, keep_all)))
    np.testing.assert_array_equal(m.logits(ids), dense_batch)
    inputs = teal.InputSparsity(m, keep_all, columns=True)
    m.use_ffn(teal.TealFFN(m, None, inputs))
    np.testing.assert_allclose(m.logits(ids), dense_batch, rtol=1e-4, atol=1e-4 * np.abs(dense_batch).max())
    got = _decode(m, ids)
    assert sum(p is not None for p in inputs.packs.values()) == 3 * m.args.n_layer  # gate|up's 2 x 172 rows: not
    # whole blocks
    np.testing.assert_allclose(got, dense, rtol=1e-4, atol=1e-4 * np.abs(dense).max())
    assert np.all(inputs.kept_share()[:, [teal.QKV, teal.O, teal.DOWN]] > 0.99)


def test_decode_columns_agree_with_the_masked_dense_path(make_model):
    """At half the channels dropped, tokens through the column packs (the prompt's first token as a batch, then decode
    tokens) and through the dense kernels on the masked input keep the same channels and give the same logits (an F32
    model: float32 columns, so only the order of the sums differs; the quantized columns' error is
    test_column_kernel_matches_numpy's: through a random model sitting on its thresholds it flips channels near one,
    and those move the next layers)."""
    m = sparserun.load(make_model("F32", shape="small"), kv_type="f32")
    ids = m.tokenize("The quick brown fox jumps over the lazy dog and runs away")
    t, shares, n = teal.calibrate_teal(m, ids, 0.5, "uniform")
    assert np.all(shares == 0.5) and np.all(t > 0)
    inputs = teal.InputSparsity(m, t, columns=False)  # the masked dense kernels
    m.use_ffn(teal.TealFFN(m, None, inputs))
    masked = _decode(m, ids)
    kept_masked = inputs.kept_share().copy()
    inputs = teal.InputSparsity(m, t, dropped=shares)  # at 50% dropped every input reads columns
    assert inputs.columns.all()
    m.use_ffn(teal.TealFFN(m, None, inputs))
    cols = _decode(m, ids)
    assert sum(p is not None for p in inputs.packs.values()) == 4 * m.args.n_layer
    np.testing.assert_allclose(inputs.kept_share(), kept_masked, atol=1e-9)
    assert 0.3 < kept_masked.mean() < 0.7
    np.testing.assert_allclose(cols, masked, rtol=1e-3, atol=1e-3 * np.abs(masked).max())
    assert not teal.InputSparsity(m, t, dropped=np.full(t.shape, 0.2)).columns.any()  # near dense: the rows


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_K_M"])
def test_column_inputs_release_their_rows(make_model, tmp_path, qtype):
    """Under teal alone, the matrices of the inputs that read column packs give their rows back (the model holds each
    matrix once) and prompts run from the columns; the logits stay close to the masked dense path's; a read of a
    released matrix restores it first; a prompt of teal.PROMPT_ROWS tokens or more runs through the rows, read back for
    each call and given back after it (the masked path's logits bit for bit); back to dense, every matrix is restored
    and the logits are the dense ones bit for bit."""
    m = sparserun.load(make_model(qtype, shape="small"))
    ids = m.tokenize("The quick brown fox jumps over the lazy dog and runs away")
    dense = m.logits(ids)
    t, shares, _ = teal.calibrate_teal(m, ids, 0.5, "uniform")
    path = tmp_path / "t50.gguf"
    tables = teal.teal_tables(m, ids, errors=False)
    teal.save_teal(path, m, t, tables, target=0.5, allocation="uniform")
    masked = teal.InputSparsity(m, t, columns=False)
    m.use_ffn(teal.TealFFN(m, None, masked))
    want = m.logits(ids)
    long = (ids * (teal.PROMPT_ROWS // len(ids) + 2))[:teal.PROMPT_ROWS + 3]
    want_long = m.logits(long)
    m.set_sparsity(f"teal:{path}")
    assert m.inputs.columns.all()  # 50% dropped, read back from the file's tables
    mats = [w for L in m.layers for w in (L.wq, L.wk, L.wv, L.wo, L.w_gate, L.w_up, L.w_down)]
    assert all(w.released for w in mats)
    w = m.layers[0].wo
    assert (w._buf == 0).mean() > 0.75  # its whole pages are gone: zeros until restored (not those it shares)
    got = m.logits(ids)
    assert all(w.released for w in mats)  # the prompt ran from the columns
    # a long prompt batch: each matrix's rows read back for its call, the masked dense path's logits bit for bit, and
    # the rows given back after it
    np.testing.assert_array_equal(m.logits(long), want_long)
    assert all(w.released for w in mats)
    corr = lambda a, b: np.corrcoef(a.ravel(), b.ravel())[0, 1]  # noqa: E731
    # a random model sits on its thresholds: the columns' re-quantization flips channels near them, which move the
    # next layers; still nearer the masked path than dense is
    assert corr(got, want) > max(0.9, corr(dense, want))
    np.testing.assert_allclose(m.inputs.kept_share().mean(), masked.kept_share().mean(), atol=0.05)
    y = w.matmul(sparserun.weights.Acts(np.ones((1, w.cols), np.float32)))  # a read restores
    assert not w.released and w._buf.any()
    m.set_sparsity("dense")
    assert not any(w.released for w in mats)
    np.testing.assert_array_equal(m.logits(ids), dense)
    every = teal.InputSparsity(m, np.full((m.args.n_layer, 4), -1.0), columns=True)  # the re-quantization alone
    m.use_ffn(teal.TealFFN(m, None, every))
    assert corr(m.logits(ids), dense) > 0.995  # the columns add only the activations' int8 rounding
    np.testing.assert_array_equal(w.matmul(sparserun.weights.Acts(np.ones((1, w.cols), np.float32))), y)


def test_calibration_meets_the_target_and_is_bound_to_its_model(stories, make_model, tmp_path):
    """Greedy and uniform allocations skip the target share of the weight bytes on the calibration text (greedy: not
    every input alike); a thresholds file is refused for another model."""
    m = sparserun.load(stories)
    ids = m.tokenize(teal.builtin_text())[:384]
    sizes = np.array([[teal._bytes(teal._group_weights(m, li, g)) for g in range(4)] for li in range(m.args.n_layer)])
    for allocation in ("greedy", "uniform"):
        t, shares, n = teal.calibrate_teal(m, ids, 0.4, allocation)
        assert n == len(ids)
        assert 0.4 - 1e-9 <= (shares * sizes).sum() / sizes.sum() < 0.43
        inputs = teal.InputSparsity(m, t)
        m.use_ffn(teal.TealFFN(m, None, inputs))
        m.logits(ids)
        skipped = ((1 - inputs.kept_share()) * sizes).sum() / sizes.sum()
        assert abs(skipped - 0.4) < 0.03, (allocation, skipped)
        if allocation == "greedy":
            assert np.ptp(shares) > 0.1
    path = tmp_path / "teal.gguf"
    teal.save_teal(path, m, t, target=0.4)
    np.testing.assert_array_equal(teal.load_teal(path, m), t)
    other = sparserun.load(make_model("F32", shape="tiny"))
    with pytest.raises(SparserunError, match="another model"):
        teal.load_teal(path, other)
    with pytest.raises(SparserunError, match="another model"):
        other.set_sparsity(f"teal:{path}")


def test_teal_specs_first_use_and_composition(stories, tmp_path, capsys):
    """teal:S calibrates on the built-in text at first use (said on stderr) and reads its cache after; teal:S+POLICY
    leaves the FFN to POLICY and covers attention; bad specs are refused; a trace names the columns read."""
    p = parse_sparsity("teal:0.3")
    assert p.is_dense and p.teal == 0.3
    p = parse_sparsity("teal:0.3+threshold:0")
    assert isinstance(p, Threshold) and p.teal == 0.3 and p.spec == "teal:0.3+threshold:0"
    for bad in ("teal:1.5", "teal", "teal:0.3+teal:0.2", "teal:0.3+threshold:0+topk:4"):
        with pytest.raises(SparserunError):
            parse_sparsity(bad)
    m = sparserun.load(stories, sparsity="teal:0.3")
    assert "calibrating" in capsys.readouterr().err
    assert isinstance(m.sparse, teal.TealFFN) and m.inputs.groups == frozenset(range(4))
    m2 = sparserun.load(stories, sparsity="teal:0.3+threshold:0.1")
    assert "calibrating" not in capsys.readouterr().err  # the cached thresholds
    assert m2.inputs.groups == frozenset(teal.ATTENTION) and m2.sparse.inputs is m2.inputs
    np.testing.assert_array_equal(m2.inputs.t, m.inputs.t)
    ids = m.tokenize("Once upon a time")
    m.eval(ids[:-1])
    m.start_trace(tmp_path / "t.jsonl")
    m.eval(ids)
    m.stop_trace()
    from sparserun.trace import read_trace

    read = read_trace(tmp_path / "t.jsonl")[1][0]["layers"][0]["read"]
    assert "attn" not in read and 0 < read["attn_qkv"] < 1 and 0 < read["ffn_down"] < 1


def test_calibrate_command(stories, tmp_path):
    out = tmp_path / "t.gguf"
    r = subprocess.run([sys.executable, "-m", "sparserun.cli", "calibrate", str(stories), "--teal", "--target-sparsity",
                        "0.25", "--tokens", "256", "-o", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "ffn_down" in r.stdout and out.exists()
    text = tmp_path / "text.txt"
    text.write_text(teal.builtin_text()[:20000])
    r = subprocess.run([sys.executable, "-m", "sparserun.cli", "perplexity", str(stories), "-f", str(text), "--ctx", "64",
                        "--chunks", "4", "--sparsity", f"teal:{out}"], capture_output=True, text=True)
    assert r.returncode == 0 and "PPL" in r.stdout, r.stderr


def test_tables_select_any_target_as_calibration_does(stories, make_model, tmp_path):
    """One calibration's tables give the thresholds of every target: uniform ones equal to the quantiles of the inputs
    seen (interpolated between levels), greedy ones skipping the target's share of the bytes; they survive a teal
    file and a profile bit for bit, and are refused for another model."""
    from sparserun.profile import load_profile, profile_model, save_profile
    from sparserun.side_files import PROFILE

    m = sparserun.load(stories)
    ids = m.tokenize(teal.builtin_text())[:256]
    tables = teal.teal_tables(m, ids, text="pydoc")
    _, rec = teal._run(m, np.full((m.args.n_layer, 4), -1.0), ids, record=True)
    x = np.abs(np.concatenate(rec.records[1][teal.DOWN]))
    sizes = tables.sizes
    for target in (0.1, 0.25, 0.4, 0.6):
        t, shares = tables.select(target, "uniform")
        assert (shares == target).all()
        if round(target / 0.025, 6) % 1 == 0:  # on a level: the quantile itself
            assert t[1, teal.DOWN] == np.float32(np.quantile(x, target))
        assert abs((x <= t[1, teal.DOWN]).mean() - target) < 0.01
        t, shares = tables.select(target, "greedy")
        assert target - 1e-9 <= (shares * sizes).sum() / sizes.sum() < target + 0.03
        assert np.ptp(shares) > 0.05  # not every input alike
    t, _ = tables.select(0.0)
    assert (t == -1).all()  # nothing dropped
    # calibration runs its text in one context of its own, whatever the model's (its own context left as it was)...
    short = sparserun.load(stories, n_ctx=32)
    short.eval(ids[:5])
    dense = np.full((m.args.n_layer, 4), -1.0)
    logits, _ = teal._run(short, dense, ids[:150])
    np.testing.assert_allclose(logits, m.logits(ids[:150]), rtol=1e-5, atol=1e-5)
    assert short.cached == ids[:5] and short.n_ctx == 32
    short.args.n_ctx_train = 64  # ...up to the training context: past it, in windows of it, BOS again
    logits, _ = teal._run(short, dense, ids[:150])
    assert logits.shape == (150, m.n_vocab)
    np.testing.assert_allclose(logits[:64], m.logits(ids[:64]), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(logits[64:127], m.logits([ids[0]] + ids[64:127])[1:], rtol=1e-5, atol=1e-5)
    path = tmp_path / "t.gguf"
    teal.save_teal(path, m, tables.select(0.3)[0], tables, target=0.3, allocation="greedy")
    back = teal.load_tables(path, m)
    for name in ("levels", "thresholds", "errors", "sizes"):
        np.testing.assert_array_equal(getattr(back, name), getattr(tables, name))
    assert back.tokens == len(ids) and back.text == "pydoc"
    np.testing.assert_array_equal(teal.load_teal(path, m), tables.select(0.3)[0])
    p = profile_model(m, ids, teal=True, text="pydoc")
    save_profile(p, tmp_path / "p.gguf")
    np.testing.assert_array_equal(load_profile(tmp_path / "p.gguf", m).teal.errors, p.teal.errors)
    np.testing.assert_array_equal(p.teal.thresholds, tables.thresholds)  # the same first tokens, the same inputs
    assert teal.load_tables(tmp_path / "p.gguf", m, PROFILE) is not None
    other = sparserun.load(make_model("F32", shape="tiny"))
    with pytest.raises(SparserunError, match="another model"):
        teal.load_tables(path, other)
    with pytest.raises(SparserunError, match="another model"):
        teal.load_tables(tmp_path / "p.gguf", other, PROFILE)
    with pytest.raises(SparserunError, match="uniform allocation only"):
        teal.teal_tables(m, ids[:64], errors=False).select(0.3, "greedy")


def test_teal_share_reads_the_profile_beside_the_model(stories, tmp_path, capsys):
    """`sparserun profile` stores the teal tables; teal:S then selects from the profile beside the model (said on
    stderr, no calibration pass), and `calibrate --teal --profile` writes a thresholds file from it alone."""
    import shutil

    model = tmp_path / "m.gguf"
    shutil.copy(stories, model)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(teal.builtin_text()[:6000])
    r = subprocess.run([sys.executable, "-m", "sparserun.cli", "profile", str(model), "--corpus", str(corpus),
                        "--tokens", "512"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    m = sparserun.load(model, sparsity="teal:0.3")
    err = capsys.readouterr().err
    assert "from the profile" in err and "calibrating" not in err
    from sparserun.profile import load_profile

    tables = load_profile(str(model) + ".profile.gguf", m).teal
    np.testing.assert_array_equal(m.inputs.t, tables.select(0.3)[0])
    out = tmp_path / "t.gguf"
    r = subprocess.run([sys.executable, "-m", "sparserun.cli", "calibrate", str(model), "--teal", "--profile",
                        str(model) + ".profile.gguf", "--target-sparsity", "0.4", "--allocation", "uniform", "-o",
                        str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    np.testing.assert_array_equal(teal.load_teal(out, m), tables.select(0.4, "uniform")[0])
