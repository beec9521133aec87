"""PowerInfer's own files (PWRI): the model with its predictors, ffn_down_t in the neuron packs, bamboo, the GPU index.

The generated PWRI models are planted-sparsity ReLU models whose predictors are exact by construction
(models/make_test_model.powerinfer_predictors), written beside a plain GGUF of the same weights (same seed)."""
import os
import subprocess
import sys

import numpy as np
import pytest

import sparserun
from sparserun.errors import SparserunError
from sparserun.weights import Acts

TEXT = "Once upon a time there was a little dog who liked to run in the park with his friends"


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSERUN_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def pair(make_model):
    """(PWRI path, plain GGUF path) of one planted model in a type."""
    def mk(type="F32", arch="llama", shape="small", **kw):
        kw = {"planted": 0.8, "planted_rank": 15, "arch": arch, **kw}
        return make_model(type, shape, powerinfer=True, **kw), make_model(type, shape, **kw)
    return mk


class Recorder:
    """Wraps a predictor: keeps every call's residual inputs and predicted sets, per layer."""

    def __init__(self, inner):
        self.inner, self.calls = inner, {}

    def __call__(self, li, acts):
        out = self.inner(li, acts)
        self.calls.setdefault(li, []).append((acts.residual.copy(), out))
        return out


def decode_logits(m, ids):
    m.reset()
    return np.concatenate([m.eval(ids[:i + 1]) for i in range(len(ids))])


def test_pwri_logits_equal_the_plain_model_with_the_same_sets(pair):
    pwri, plain = pair("F32")
    m = sparserun.load(pwri, sparsity="predictor", kv_type="f32")
    assert m.gguf.powerinfer and m.args.down_t and m.args.activation == "relu"
    rec = m.sparse.predictor = Recorder(m.sparse.predictor)
    ids = m.tokenize(TEXT)
    got = np.concatenate([m.logits(ids), decode_logits(m, ids)])  # a prompt batch, then token by token
    sets = {li: [s for _, call in calls for s in call] for li, calls in rec.calls.items()}
    at = dict.fromkeys(sets, 0)

    def replay(li, acts):
        out = sets[li][at[li]:at[li] + len(acts.x)]
        at[li] += len(acts.x)
        return out

    ref = sparserun.load(plain, predictor=replay, kv_type="f32")
    want = np.concatenate([ref.logits(ids), decode_logits(ref, ids)])
    assert np.abs(got - want).max() < 1e-5 * want.std()
    kept = np.mean([len(s) for ss in sets.values() for s in ss]) / m.args.n_ff
    assert 0.05 < kept < 0.5, kept  # the planted sparsity, predicted: not everything
    # exact predictors of a ReLU model drop only zeros: the dense logits
    dense = sparserun.load(plain, sparsity="dense", kv_type="f32").logits(ids)
    assert np.abs(got[:len(ids)] - dense).max() < 1e-5 * dense.std()


@pytest.mark.parametrize("type", ["F32", "Q8_0", "Q4_0"])
def test_predicted_sets_are_the_numpy_evaluation_of_fc1_fc2(pair, type):
    from gguf import GGMLQuantizationType, quants

    from sparserun.gguf_file import GGUFFile

    pwri, _ = pair(type)
    for spec, t in (("predictor", 0.0), ("predictor:0.02", 0.02)):
        m = sparserun.load(pwri, sparsity=spec, kv_type="f32")
        # quantized predictors' decode tokens take the one-kernel path (fc2 as exact int8 columns)
        assert (m.sparse.predictor.columns[0] is None) == (type == "F32")
        rec = m.sparse.predictor = Recorder(m.sparse.predictor)
        ids = m.tokenize(TEXT)
        m.logits(ids)  # a prompt batch
        decode_logits(m, ids[:10])  # and decode tokens
        f = GGUFFile(pwri)  # gguf-py's reader refuses the PWRI magic; its dequantizer reads the bytes
        w = {n: quants.dequantize(t.raw.reshape(t.rows, t.row_bytes), GGMLQuantizationType(t.qtype))
             for n in f.tensor_names if ".fc" in n for t in [f.tensor(n)]}
        compared = 0
        for li, calls in rec.calls.items():
            for x, got in calls:
                s = np.maximum(x.astype(np.float64) @ w[f"blk.{li}.fc1.weight"].T, 0) @ w[f"blk.{li}.fc2.weight"].T
                # rows kept where score >= t; a score within rounding of t may fall either way (int8 activation
                # blocks for Q8_0 weights, as ggml rounds them; float summation order for F32)
                band = (1e-5 if type == "F32" else 2e-2) * np.abs(s).max()
                for row, g in zip(s, got):
                    sure = np.abs(row - t) > band
                    want = np.flatnonzero((row >= t) & sure)
                    assert np.isin(want, g).all() and not np.isin(np.flatnonzero((row < t) & sure), g).any()
                    compared += sure.sum()
        assert compared > 0.95 * sum(len(x) for calls in rec.calls.values() for x, _ in calls) * m.args.n_ff


@pytest.mark.parametrize("type", ["Q4_0", "Q8_0", "F32"])
def test_ffn_down_t_is_the_packs_down_columns_unchanged(pair, type):
    from sparserun.ffn_pack import down_columns, down_kind
    from sparserun.kernels import sparse as S

    pwri, plain = pair(type)
    m = sparserun.load(pwri, sparsity="dense", kv_type="f32")
    down = m.layers[0].w_down
    src = down.source.raw.reshape(down.source.rows, -1)
    cols = down_columns(down, down_kind(down.qtype))
    if type == "F32":
        assert np.array_equal(cols, src)
    else:  # the file's quants, then its fp16 scales: the same bytes, reordered
        qb = 16 if type == "Q4_0" else 32
        blocks = src.reshape(src.shape[0], -1, 2 + qb)
        assert np.array_equal(cols[:, :-blocks.shape[1] * 2].reshape(blocks.shape[0], -1, qb), blocks[:, :, 2:])
        assert np.array_equal(cols[:, -blocks.shape[1] * 2:].reshape(blocks.shape[0], -1, 2), blocks[:, :, :2])
    assert S.down_bytes.py_func(down_kind(down.qtype), m.args.dim) == cols.shape[1]
    # one fixed 40% of the neurons: decode tokens through the packs (ffn_down_t's rows as down columns) against a
    # prompt batch, which computes the same sets densely over ffn_down_t (the transposed product)
    keep = np.sort(np.random.default_rng(5).choice(m.args.n_ff, int(0.4 * m.args.n_ff), replace=False))
    fixed = sparserun.load(pwri, predictor=lambda li, acts: [keep] * len(acts.x), kv_type="f32")
    ids = m.tokenize(TEXT)
    batch = fixed.logits(ids)
    assert np.abs(decode_logits(fixed, ids) - batch).max() < (1e-5 if type == "F32" else 0.02) * batch.std()


def test_bamboo_runs_relu_on_gate_and_up(pair):
    pwri, plain = pair("F32", arch="bamboo")
    for path in (plain, pwri):
        m = sparserun.load(path, sparsity="dense", kv_type="f32")
        assert m.args.arch == "bamboo" and m.args.activation == "relu_sym"
        L = m.layers[1]
        x = np.random.default_rng(0).standard_normal((3, m.args.dim)).astype(np.float32)
        g, u, d = L.w_gate.dequantize(), L.w_up.dequantize(), L.w_down.dequantize()
        want = (np.maximum(x @ g.T, 0) * np.maximum(x @ u.T, 0)) @ d.T
        got = m.ffn(1, Acts(x))
        assert np.abs(got - want).max() < 1e-4 * np.abs(want).max()
    # the PWRI bamboo's predicted path equals its dense path (exact predictors: only zeros dropped)
    ids = m.tokenize(TEXT)
    dense = m.logits(ids)
    assert np.abs(decode_logits(sparserun.load(pwri, sparsity="predictor", kv_type="f32"), ids) - dense).max() \
        < 1e-4 * dense.std()


def test_gpu_index_round_trip_and_the_hybrid_honours_it(pair, tmp_path):
    from sparserun.powerinfer import read_gpu_index, write_gpu_index

    pwri, _ = pair("F32", shape="tiny", planted_rank=7)
    m = sparserun.load(pwri, kv_type="f32")
    a = m.args
    rng = np.random.default_rng(3)
    hot = [np.sort(rng.choice(a.n_ff, n, replace=False)) for n in (40, 0)]  # a split layer, an all-CPU one
    idx = tmp_path / "model.gpuidx"
    write_gpu_index(idx, hot, a.n_ff, 12345)
    p = read_gpu_index(idx, m)
    assert [list(g) for g in p.gpu_neurons] == [list(g) for g in hot] and p.budget == 12345
    assert not p.attn_gpu.any() and not p.output_gpu
    ids = m.tokenize(TEXT)[:8]
    cpu = sparserun.load(pwri, n_ctx=32, sparsity="predictor", kv_type="f32")
    ref = cpu.logits(ids)
    hyb = sparserun.load(pwri, n_ctx=32, sparsity="predictor", device="cuda", placement=str(idx), kv_type="f32")
    assert [list(g) for g in hyb.placement.gpu_neurons] == [list(g) for g in hot]
    assert np.abs(hyb.logits(ids) - ref).max() < 1e-4 * ref.std()
    assert np.abs(decode_logits(hyb, ids) - ref).max() < 1e-4 * ref.std()


def test_refusals(pair, make_model, tmp_path):
    from sparserun.powerinfer import read_gpu_index, write_gpu_index

    pwri, plain = pair("F32", shape="tiny", planted_rank=7)
    m = sparserun.load(pwri)
    other = tmp_path / "other.gpuidx"
    write_gpu_index(other, [np.arange(10)] * 3, m.args.n_ff)  # three layers: another model's
    with pytest.raises(SparserunError, match="not a GPU index for .*3 layers, the model has 2"):
        read_gpu_index(other, m)
    write_gpu_index(other, [np.arange(10)] * 2, 2 * m.args.n_ff)
    with pytest.raises(SparserunError, match="gpu_idx of 256 entries, the model has 128"):
        read_gpu_index(other, m)
    with pytest.raises(SparserunError, match="expected a PWRI 'generic.gpu_index' file"):
        read_gpu_index(pwri, m)  # a PWRI model is no index
    with pytest.raises(SparserunError, match="no PowerInfer predictors"):
        sparserun.load(plain, sparsity="predictor:0.5")
    # a damaged PWRI file: one line, exit code 2, from every command
    data = open(pwri, "rb").read()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:len(data) // 2])
    r = subprocess.run([sys.executable, "-m", "sparserun.cli", "generate", str(cut), "-p", "hi", "-n", "2",
                        "--sparsity", "predictor"], capture_output=True, text=True, timeout=300, env=dict(os.environ))
    assert r.returncode == 2 and "Traceback" not in r.stderr and "truncated" in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = subprocess.run([sys.executable, "-m", "sparserun.cli", "info", str(pwri)], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and "PowerInfer (PWRI)" in r.stdout and "threshold 0" in r.stdout, r.stderr


def test_export_powerinfer_round_trip(make_model, tmp_path):
    """sparserun-trained predictors in PowerInfer's form, written into a PWRI file: PowerInfer's layout, and the same
    neuron sets from the file as from sparserun's own predictor file."""
    from predictors.train import train_predictors
    from sparserun.gguf_file import GGUFFile
    from sparserun.powerinfer import export, fold_thresholds

    plain = make_model("Q8_0", "small", planted=0.8, planted_rank=15)
    m = sparserun.load(plain, kv_type="f32")
    ids = m.tokenize(TEXT * 12)[:160]
    pset, report = train_predictors(m, ids, target_recall=0.99, ranks=(32, 64), form="powerinfer")
    assert pset.input == "residual" and all(np.all(p.b1 == 0) and np.all(p.b2 == 0) for p in pset.layers)
    assert min(r["recall"] for r in report) > 0.9
    pfile = tmp_path / "p.predictors.gguf"
    pset.save(pfile)
    out = tmp_path / "m.powerinfer.gguf"
    T, eff = export(m, pset, out)
    assert open(out, "rb").read(4) == b"PWRI"
    f, src = GGUFFile(out), GGUFFile(plain)
    for name in src.tensor_names:  # every tensor as it was, ffn_down transposed
        if name.endswith("ffn_down.weight"):
            got = sparserun.weights.Weight(f.tensor(name.replace("ffn_down", "ffn_down_t"))).dequantize()
            want = sparserun.weights.Weight(src.tensor(name)).dequantize().T
            assert np.abs(got - want).max() <= 0.02 * np.abs(want).max()  # re-quantized once, Q8_0
        else:
            assert np.array_equal(f.tensor(name).raw, src.tensor(name).raw), name
    pw = sparserun.load(out, sparsity="predictor", kv_type="f32")
    assert pw.sparse.predictor.threshold == T == fold_thresholds([p.threshold for p in pset.layers])[0]
    own = sparserun.load(plain, sparsity=f"predictor:{pfile}", kv_type="f32")
    sets = []
    for mm in (pw, own):
        rec = mm.sparse.predictor = Recorder(mm.sparse.predictor)
        mm.logits(ids[:40])
        sets.append([s for li in sorted(rec.calls) for _, call in rec.calls[li] for s in call])
    # the same predictors, rounded differently (float16 in the file, int8 rows in sparserun's evaluation)
    agree = np.mean([len(np.intersect1d(a, b)) / max(1, len(np.union1d(a, b))) for a, b in zip(*sets)])
    assert agree > 0.9, agree
    with pytest.raises(SparserunError, match="already a PowerInfer"):
        export(pw, pset, tmp_path / "again.gguf")


def test_a_pwri_file_runs_its_predictors_by_default(pair):
    pwri, plain = pair("F32", shape="tiny", planted_rank=7)
    assert sparserun.load(pwri).policy.name == "predictor"
    assert sparserun.load(pwri, sparsity="dense").policy.is_dense and sparserun.load(plain).policy.is_dense
    r = subprocess.run([sys.executable, "-m", "sparserun.cli", "generate", str(pwri), "-p", "Once", "-n", "4",
                        "--temp", "0"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "running its own predictors" in r.stderr, r.stderr


def test_garbage_predictor_scales_are_refused_in_one_line(pair, tmp_path):
    pwri, _ = pair("Q8_0", shape="tiny", planted_rank=7)
    from sparserun.gguf_file import GGUFFile

    f = GGUFFile(pwri)
    t = f.tensor("blk.0.fc2.weight")
    at = t.raw.__array_interface__["data"][0] - f._data.__array_interface__["data"][0]
    data = bytearray(open(pwri, "rb").read())
    data[at:at + 2] = np.array([np.inf], np.float16).tobytes()  # the first block's scale
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(bytes(data))
    r = subprocess.run([sys.executable, "-m", "sparserun.cli", "generate", str(bad), "-p", "hi", "-n", "2"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr and "non-finite block scales" in r.stderr, r.stderr
