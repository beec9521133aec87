"""Sparse FFN: kernels against numpy, every policy against the dense path, bad specs refused."""
import numpy as np
import pytest

import sparserun
from sparserun.errors import SparserunError
from sparserun.kernels import ops
from sparserun.kernels import quant as K
from sparserun.kernels import sparse as S
from sparserun.sparsity import POLICIES, parse_sparsity, save_thresholds

ONLY_ONE_ROUTE = pytest.mark.skipif(not K.HAS_VNNI, reason="this CPU has no AVX512-VNNI: the whole suite runs the "
                                    "route SPARSERUN_NO_VNNI=1 forces, so there is no second route to compare")


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSERUN_CACHE", str(tmp_path / "cache"))


def test_select_kernels():
    a = np.array([0.5, -3.0, 0.0, 2.0, -0.1, 0.0, 1.0], np.float32)
    idx = np.empty(7, np.int64)
    n = S.select_threshold(a, np.float32(0.0), idx)
    assert list(idx[:n]) == [0, 1, 3, 4, 6]  # ReLU-style natural zeros dropped
    n = S.select_threshold(a, np.float32(0.6), idx)
    assert list(idx[:n]) == [1, 3, 6]
    n = S.select_topk(a, 2, idx)
    assert list(idx[:n]) == [1, 3]
    n = S.select_topk(a, 6, idx)  # more than the non-zeros: only the non-zeros
    assert list(idx[:n]) == [0, 1, 3, 4, 6]
    ties = np.array([1.0, 1.0, 1.0, 2.0], np.float32)
    assert S.select_topk(ties, 2, idx) == 2 and list(idx[:2]) == [0, 3]


class _Tensor:
    """The parts of a Weight that NeuronPack reads, for a float32 (rows, cols) matrix."""

    def __init__(self, w, qtype=0, raw=None, row_bytes=None):
        self.rows, self.cols = w.shape
        self.qtype, self.type_name = qtype, {0: "F32", 2: "Q4_0", 8: "Q8_0"}[qtype]
        self.raw = w.view(np.uint8).reshape(-1) if raw is None else raw
        self.row_bytes = w.shape[1] * 4 if row_bytes is None else row_bytes
        self._w = w

    def dequantize(self):
        return self._w


@pytest.mark.parametrize("down_qtype", [0, 8, 2])
def test_neuron_pack_kernel_matches_numpy(tmp_path, down_qtype):
    """pack_ffn in its three modes against numpy on float32 up rows and float32 / int8 / 4-bit down columns."""
    from sparserun.ffn_pack import NeuronPack
    from sparserun.weights import Acts

    rng = np.random.default_rng(0)
    up, down = rng.standard_normal((300, 128)).astype(np.float32), rng.standard_normal((64, 300)).astype(np.float32)
    # the pack re-quantizes a Q8_0 source's columns to int8 and a Q4_0 source's to 4 bits
    pack = NeuronPack(None, _Tensor(up), _Tensor(down, qtype=down_qtype), str(tmp_path), 0)
    assert pack.kind == {0: S.DOWN_F32, 8: S.DOWN_Q8, 2: S.DOWN_Q4}[down_qtype]
    dcols = down.T.copy()
    s = np.empty((300, 2), np.float32)
    if down_qtype == 8:
        q = np.empty(dcols.shape, np.int8)
        S.quantize_rows_q8(dcols, q, s)
        s = s.astype(np.float16).astype(np.float32)  # the pack stores the scales as fp16
        dq = q.astype(np.float32) * np.repeat(s, 32, axis=1)
        assert np.abs(dq - dcols).max() <= np.abs(dcols).max() / 127  # the int8 layout's error bound
        dcols = dq
    elif down_qtype == 2:
        q = np.empty((300, 32), np.uint8)
        S.quantize_rows_q4(dcols, q, s)
        s = s.astype(np.float16).astype(np.float32)
        nib = np.concatenate([q.reshape(300, 2, 16) & 15, q.reshape(300, 2, 16) >> 4], axis=2).reshape(300, 64)
        dq = (nib.astype(np.float32) - 8) * np.repeat(s, 32, axis=1)
        assert np.abs(dq - dcols).max() <= np.abs(dcols).max() / 7  # 4 bits: half a step of |max| / 8
        dcols = dq
    idx = np.sort(rng.choice(300, 57, replace=False)).astype(np.int64)
    coef = rng.standard_normal(57).astype(np.float32)
    x = rng.standard_normal((1, 128)).astype(np.float32)
    out = np.empty(64, np.float32)
    u = up[idx] @ x[0]

    def check(h):
        want = h @ dcols[idx]
        tol = 1e-4 * (1 + np.abs(want))
        if down_qtype in (2, 8):  # quantized columns: the integer axpy on every CPU
            # axpy_q4_vnni / axpy_i8_vnni (or the generic twin) round each term's coefficient h_j * scale to int8 with at most the block's
            # largest |h * scale| / 127 as step: at most half a step times |nibble - 8| (|int8|) per term
            a = np.abs(s[idx])  # (kept, blocks) block scales
            hs = np.abs(h)[:, None] * a
            tol += 0.5 / 127 * np.repeat(hs.max(axis=0), 32) * (np.abs(dcols[idx]) / np.repeat(a, 32, axis=1)).sum(0)
        assert np.all(np.abs(out - want) <= tol), np.abs(out - want).max()

    for mode, h in [(S.AXPY_ONLY, coef), (S.COEF_TIMES_DOT, coef * u), (S.ACT_OF_DOT, np.maximum(u, 0))]:
        pack.run(Acts(x), idx, 57, coef, mode, 1, out)  # act 1: relu
        check(h)
    with pytest.raises(ValueError, match="no gate rows"):
        pack.run(Acts(x), idx, 57, coef, S.GATED_DOTS, 1, out)
    gate = rng.standard_normal((300, 128)).astype(np.float32)  # a pack with gate rows: the predictor layout
    gated = NeuronPack(_Tensor(gate), _Tensor(up), _Tensor(down, qtype=down_qtype), str(tmp_path), 1)
    gated.run(Acts(x), idx, 57, coef, S.GATED_DOTS, 0, out)  # act 0: silu
    g = gate[idx] @ x[0]
    check(g / (1 + np.exp(-g)) * u)


def test_pack_units_page_padded(tmp_path):
    """Units that pad to a page at small cost are page-sized and page-aligned in the cached file and in memory
    (none straddles two pages), the kernels read them through the padding, and a reload finds the same file
    (shared while loaded; else read into huge pages); units that would waste more stay packed tight."""
    from sparserun.ffn_pack import NeuronPack, unit_stride
    from sparserun.memory import HUGE
    from sparserun.weights import Acts

    assert unit_stride(3456) == 4096 and unit_stride(2432) == 2432 and unit_stride(7168) == 8192
    rng = np.random.default_rng(5)
    up, down = rng.standard_normal((40, 960)).astype(np.float32), rng.standard_normal((32, 40)).astype(np.float32)
    pack = NeuronPack(None, _Tensor(up), _Tensor(down), str(tmp_path), 0)  # 3840 + 128 bytes a unit
    assert pack.unit_bytes == 4096 and pack.units.ctypes.data % 4096 == 0
    x = rng.standard_normal((1, 960)).astype(np.float32)
    idx = np.array([0, 3, 17, 18, 39], np.int64)
    out = np.empty(32, np.float32)
    pack.run(Acts(x), idx, 5, np.empty(0, np.float32), S.ACT_OF_DOT, 1, out)
    want = np.maximum(up[idx] @ x[0], 0) @ down.T[idx]
    np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    again = NeuronPack(None, _Tensor(up), _Tensor(down), str(tmp_path), 0)  # the cached file, already loaded
    assert again.unit_bytes == 4096 and again.units is pack.units
    del pack, again
    fresh = NeuronPack(None, _Tensor(up), _Tensor(down), str(tmp_path), 0)  # read from the file again
    assert fresh.units.ctypes.data % HUGE == 0 and not fresh.units.flags.writeable  # huge-page aligned (memory.py)
    fresh.run(Acts(x), idx, 5, np.empty(0, np.float32), S.ACT_OF_DOT, 1, out)
    np.testing.assert_allclose(out, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    stored = np.load(next(tmp_path.glob("pack.0.*.npy")))  # the file is a plain .npy
    np.testing.assert_array_equal(stored.reshape(-1), fresh.units)
    small = NeuronPack(None, _Tensor(up[:, :128].copy()), _Tensor(down), str(tmp_path), 1)
    assert small.unit_bytes == 128 * 4 + 32 * 4


_AXPY_RUNS = {}  # (kind, simd.axpy.X86_AVX2) -> the compiled run of test_int8_coefficient_axpy_equals_its_rounding


@pytest.mark.parametrize("cnt", [8, 5, 3, 1])
@pytest.mark.parametrize("kind", ["q4", "i8"])
def test_int8_coefficient_axpy_equals_its_rounding(cnt, kind, monkeypatch):
    """axpy_q4_vnni (4-bit columns) and axpy_i8_vnni (int8 columns) with _coefs_i8 against numpy doing the same
    rounding (per block: the group's terms h_g * scale rounded to int8 with one scale max / 127); a group under
    AXPY_GROUP is padded. Where the CPU has no AVX512-VNNI, their generic-IR twins (the same sums); on an AVX2 host the
    generic form's x86 code (4-bit columns: channel pairs through pmaddubsw) equals its portable form bit for bit."""
    from numba import njit

    from sparserun.kernels import simd

    axpy = {("q4", True): simd.axpy_q4_vnni, ("q4", False): simd.axpy_q4_generic, ("i8", True): simd.axpy_i8_vnni,
            ("i8", False): simd.axpy_i8_generic}[kind, bool(K.HAS_VNNI)]

    G = S.AXPY_GROUP
    rng = np.random.default_rng(cnt)
    nb, n_units = 37, 9  # coefs_q4_vnni: two 16-block vectors, then 5 blocks one at a time
    qb = 16 if kind == "q4" else 32
    q = rng.integers(0, 256, (n_units, nb * qb), dtype=np.uint8)
    if kind == "i8":
        q[q == 128] = 129  # int8 columns hold -127..127
    sc = ((rng.random((n_units, nb)) + 0.1) * 0.02).astype(np.float16)  # the pack's fp16 scales
    u = np.concatenate([q, sc.view(np.uint8)], axis=1).reshape(-1)
    sc = sc.astype(np.float32)
    unit = q.shape[1] + sc.shape[1] * 2
    pick = np.array([3, 0, 8, 4, 1, 7, 2, 6])[:cnt]
    offs = np.zeros(G, np.int64)
    offs[:cnt] = pick * unit
    h = np.zeros(G, np.float32)
    h[:cnt] = rng.standard_normal(cnt).astype(np.float32) * 3

    def compiled():  # one compile per kind and form, shared by the counts (each took 0.4 s)
        key = kind, simd.axpy.X86_AVX2
        if key not in _AXPY_RUNS:
            def run(acc, u, offs, h, cnt, nb):
                co = S._coef_scratch(nb)
                S._coefs_i8(u, offs, h, cnt, nb, nb * qb, co)
                axpy(acc, u, offs, co[0], co[1], co[2], nb, np.full(G, -1, np.int64))
            _AXPY_RUNS[key] = njit(run)
        return _AXPY_RUNS[key]

    acc = rng.standard_normal(nb * 32).astype(np.float32)
    want, start = acc.copy(), acc.copy()
    compiled()(acc, u, offs, h, cnt, nb)
    if not K.HAS_VNNI and simd.axpy.X86_AVX2:
        monkeypatch.setattr(simd.axpy, "X86_AVX2", False)  # read at code generation: the portable form
        compiled()(start, u, offs, h, cnt, nb)
        np.testing.assert_array_equal(start, acc)
    c = h[:cnt, None] * sc[pick]  # (cnt, nb) terms
    step = np.abs(c).max(axis=0) / 127
    cq = np.rint(c / np.where(step > 0, step, 1)).astype(np.float32) * step  # the rounded terms
    if kind == "q4":
        w = np.concatenate([q[pick].reshape(cnt, nb, 16) & 15, q[pick].reshape(cnt, nb, 16) >> 4], axis=2) - 8.0
    else:
        w = q[pick].view(np.int8).reshape(cnt, nb, 32).astype(np.float32)
    want += (w * cq[:, :, None]).sum(0).reshape(-1)
    np.testing.assert_allclose(acc, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spec,kind,values", [("dense", "dense", ()), ("topk:0.1", "topk", (0.1,)), ("topk:64", "topk", (64,)),
                                              ("topk:8,16", "topk", (8, 16)), ("threshold:0", "threshold", (0,)),
                                              ("threshold:0.1,0.2", "threshold", (0.1, 0.2))])
def test_parse_sparsity(spec, kind, values):
    p = parse_sparsity(spec)
    assert p.name == kind and p.values == values and type(p) is POLICIES[kind]


@pytest.mark.parametrize("spec,words", [("sparse", "unknown policy"), ("topk", "needs a value"), ("topk:0", "k must be"),
                                        ("topk:1.5", "k must be"), ("topk:abc", "not a number"), ("threshold:-1", ">= 0"),
                                        ("threshold:nope.json", "no such thresholds file"), ("dense:3", "takes no value")])
def test_bad_sparsity_specs(spec, words):
    with pytest.raises(SparserunError, match=words):
        parse_sparsity(spec)


def test_thresholds_file_and_layer_count(stories, tmp_path):
    f = tmp_path / "t.json"
    save_thresholds(f, [0.0] * 5)
    assert parse_sparsity(f"threshold:{f}").values == (0.0,) * 5
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(SparserunError, match="not a thresholds file"):
        parse_sparsity(f"threshold:{tmp_path / 'bad.json'}")
    with pytest.raises(SparserunError, match="3 values for a model of 5 layers"):
        sparserun.load(stories, sparsity="topk:1,2,3")


def decode_logits(m, ids):
    """Logits of every position, one token at a time (the sparse decode path)."""
    m.reset()
    return np.array([m.eval(ids[: i + 1])[-1] for i in range(len(ids))])


@pytest.mark.parametrize("spec", ["topk:1.0", "topk:172", "threshold:0"])
def test_keep_everything_equals_dense_f32(stories, spec):
    ids = sparserun.load(stories).tokenize("Once upon a time, there was a little girl named Lily. She loved")
    dense = sparserun.load(stories).logits(ids)
    m = sparserun.load(stories, sparsity=spec)
    np.testing.assert_allclose(decode_logits(m, ids), dense, atol=1e-4)  # decode: gather + neuron-major axpy
    np.testing.assert_allclose(m.logits(ids), dense, atol=1e-4)  # prompt batch: masked dense path


@pytest.mark.parametrize("qtype", ["Q4_0", "Q8_0"])
def test_keep_everything_equals_dense_quantized(make_model, qtype):
    """Keeping every neuron runs the original weights (masked dense kernels): dense's logits."""
    path = make_model(qtype)
    ids = sparserun.load(path).tokenize("The quick brown fox jumps over the lazy dog and runs away")
    dense = sparserun.load(path).logits(ids)
    np.testing.assert_allclose(decode_logits(sparserun.load(path, sparsity="topk:1.0"), ids), dense, atol=1e-4)


@pytest.mark.parametrize("qtype,max_tol,mean_tol", [("Q4_0", 0.35, 0.06), ("Q8_0", 0.15, 0.02)])
def test_neuron_pack_error(make_model, qtype, max_tol, mean_tol):
    """What the gathered decode kernels change, isolated: the same top-k selection decoded through them
    against the prompt path, which applies it to the original weights. Two roundings differ: the
    pack's down columns are re-quantized (4-bit for 4-bit sources, same quant bytes per neuron; int8
    otherwise), and the axpy takes the FFN activations in float where the dense down matmul rounds them
    to int8 blocks. Measured on this random model, relative to the logits' std: Q4_0 max 0.27 / mean
    0.043, Q8_0 max 0.088 / mean 0.012 (llama.cpp differs from the dense path by max 0.2 / mean 0.024). A float32
    KV cache keeps its rounding out of the comparison (with f16 the chaotic maximum moves: Q8_0 max 0.122 / mean
    0.013, Q4_0 0.263 / 0.043). The int8 columns' axpy rounds its coefficients to int8 per block on every CPU (as
    the 4-bit one does): Q8_0 max 0.127 / mean 0.0135 on the AVX2 route."""
    path = make_model(qtype)
    m = sparserun.load(path, sparsity="topk:0.3", kv_type="f32")
    ids = m.tokenize("The quick brown fox jumps over the lazy dog and runs away")
    exact = m.logits(ids)
    d = np.abs(decode_logits(m, ids) - exact) / exact.std()
    assert d.max() < max_tol and d.mean() < mean_tol, (d.max(), d.mean())


def test_relu_natural_zeros_are_skipped_exactly(make_model):
    path = make_model("F32", shape="tiny", planted=0.8)
    ids = sparserun.load(path).tokenize("The quick brown fox jumps over the lazy dog and runs away")
    dense = sparserun.load(path).logits(ids)
    m = sparserun.load(path, sparsity="threshold:0")
    np.testing.assert_allclose(decode_logits(m, ids), dense, atol=1e-4)
    kept = m.sparse.kept_fraction()
    assert (kept > 0.05).all() and (kept < 0.5).all(), kept  # planted: most neurons are zero


@pytest.mark.parametrize("qtype", ["F32", "Q4_0", "Q8_0", "Q4_K_M"])
def test_fused_threshold_kernel_equals_the_unfused_path(make_model, qtype):
    """select_pack_ffn (selection rows, keep rule and pack in one kernel) against gate matmul + select +
    pack_ffn on the same token: the same neurons and the same arithmetic, summed in another order (repacked K-quant
    gates scanned with the dense matmul's own dot and activation rounding)."""
    from sparserun.weights import Acts

    from sparserun.sparse_ffn import DENSE_ABOVE

    m = sparserun.load(make_model(qtype, shape="small" if qtype == "Q4_K_M" else "tiny", planted=0.8),
                       sparsity="threshold:0")  # (K-quants need rows of 256)
    if qtype == "Q4_K_M":
        assert {L.w_gate.qtype for L in m.layers} & set(S.KR_TYPES)  # the case this covers
    sp, ffn_inputs = m.sparse, {}
    ids = m.tokenize("The quick brown fox jumps over the lazy dog")
    m.eval(ids[:-1])
    m.ffn = lambda li, acts: ffn_inputs.setdefault(li, acts.x.copy()) is not None and sp(li, acts)
    m.eval(ids)  # one decode token: record each layer's FFN input
    for li, L in enumerate(m.layers):
        fused = sp._selected(li, L, Acts(ffn_inputs[li]))[0]
        n_fused = sp.last_kept[li]
        sp.last_kept[li] = 1.0  # above DENSE_ABOVE: the next token takes the unfused path
        unfused = sp(li, Acts(ffn_inputs[li]))[0]
        assert sp.last_kept[li] == n_fused and 0.02 < n_fused <= DENSE_ABOVE, n_fused  # the same few neurons
        # 4-bit and int8 down columns: each path rounds its groups' coefficients to int8 (exactly checked in
        # test_int8_coefficient_axpy_equals_its_rounding), and the two paths group the kept neurons differently
        rel = 1e-2 if qtype in ("Q4_0", "Q4_K_M", "Q8_0") else 1e-5
        np.testing.assert_allclose(fused, unfused, rtol=1e-4, atol=rel * np.abs(unfused).max())


def test_topk_keeps_k_and_degrades_gracefully(stories):
    ids = sparserun.load(stories).tokenize("Once upon a time, there was a little girl named Lily. She loved to play")
    dense = sparserun.load(stories).logits(ids)
    agree = []
    for frac in (0.75, 0.25):
        m = sparserun.load(stories, sparsity=f"topk:{frac}")
        got = decode_logits(m, ids)
        assert np.allclose(m.sparse.kept_fraction(), round(frac * 172) / 172)
        agree.append((got.argmax(1) == dense.argmax(1)).mean())
    assert agree[0] >= agree[1] and agree[0] > 0.8


@pytest.mark.parametrize("which", ["stories", "Q4_0"])
def test_predicted_neuron_set_computes_only_those(stories, make_model, which):
    """A predictor hands the neuron set: gate, up and down are computed for it alone. The oracle
    (true top-k of |act(gate)|) gives exactly the top-k policy's result. On a Q4_0 model the predictor pack
    interleaves the repacked gate and up rows (ffn_pack.interleave_rows), on either route."""
    path = stories if which == "stories" else make_model("Q4_0", dim=544)  # 17 blocks: 2 groups of 8 and a tail
    # float32 caches: an f16 one rounds queries and probabilities to half, which turns the two paths' float
    # summation orders into occasional half-ulp steps
    dense = sparserun.load(path, kv_type="f32")
    topk = sparserun.load(path, sparsity="topk:40", kv_type="f32")

    from sparserun.weights import Acts

    def oracle(layer, acts):
        g = dense.layers[layer].w_gate.matmul(Acts(acts.x))  # the engine's own gate dots (int8 activations on Q4_0)
        a = np.empty_like(g)
        ops.ffn_activate(g[:0], g, 0, a)  # and its own SiLU (numpy's exp can order a near-tie the other way)
        a = np.abs(a)
        return [np.sort(np.argsort(-row, kind="stable")[:40]) for row in a]

    pred = sparserun.load(path, predictor=oracle, kv_type="f32")
    if which == "Q4_0":
        assert pred.sparse.pack[0].interleaved
    ids = dense.tokenize("Once upon a time, there was a little girl")
    want = decode_logits(topk, ids)
    tol = 1e-4 * max(1.0, np.abs(want).max())
    np.testing.assert_allclose(decode_logits(pred, ids), want, atol=tol)
    np.testing.assert_allclose(pred.logits(ids), topk.logits(ids), atol=tol)


STORY = ("Once upon a time, there was a little boy named Tim. Tim loved to play with his red ball in the big park. "
         "One day, Tim saw a small dog. The dog was sad because it was lost. Tim said, \"Do not be sad, little dog. "
         "I will help you find your home.\" They walked and walked until they saw a big house.")


def test_calibrated_thresholds_hit_the_target_sparsity(stories):
    from sparserun.calibrate import calibrate_thresholds

    m = sparserun.load(stories)
    ids = m.tokenize(STORY)
    t = calibrate_thresholds(m, ids, 0.5)
    assert len(t) == 5 and all(x > 0 for x in t)
    sm = sparserun.load(stories, sparsity="threshold:" + ",".join(str(x) for x in t))
    sm.logits(ids)  # the same tokens: the prompt path applies the thresholds per token
    assert np.abs(sm.sparse.kept_fraction() - 0.5).max() < 0.02, sm.sparse.kept_fraction()


def test_calibrate_cli_writes_a_thresholds_file(stories, tmp_path):
    import subprocess
    import sys

    corpus, out = tmp_path / "c.txt", tmp_path / "t.json"
    corpus.write_text(STORY)
    r = subprocess.run([sys.executable, "-m", "sparserun.cli", "calibrate", str(stories), "--corpus", str(corpus),
                        "--target-sparsity", "0.3", "-o", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert len(parse_sparsity(f"threshold:{out}").values) == 5


def test_neuron_pack_cache_problems_are_one_line_errors(make_model, tmp_path, monkeypatch):
    path = make_model("Q4_0", shape="tiny", planted=0.8)
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    monkeypatch.setenv("SPARSERUN_CACHE", str(blocker / "cache"))  # a directory inside a file: cannot exist
    with pytest.raises(SparserunError, match="cannot write the neuron-pack cache .*SPARSERUN_CACHE"):
        sparserun.load(path, sparsity="threshold:0")
    monkeypatch.setenv("SPARSERUN_CACHE", str(tmp_path / "cache"))
    sparserun.load(path, sparsity="threshold:0")  # builds the packs
    packs = sorted((tmp_path / "cache").glob("*/pack.0.*.npy"))
    assert len(packs) == 1
    packs[0].write_bytes(packs[0].read_bytes()[:200])  # truncated
    with pytest.raises(SparserunError, match="pack.0.*unreadable neuron-pack cache.*remove it"):
        sparserun.load(path, sparsity="threshold:0")
    np.save(packs[0], np.zeros((3, 5), np.uint8))  # a valid .npy of the wrong shape
    with pytest.raises(SparserunError, match="pack.0.*stale neuron-pack cache"):
        sparserun.load(path, sparsity="threshold:0")


@ONLY_ONE_ROUTE
def test_non_vnni_build_runs_and_agrees(make_model, tmp_path):
    """SPARSERUN_NO_VNNI=1 (as on a CPU without AVX512-VNNI): the VNNI intrinsics compile to traps the kernels
    never reach, the generic dots and the float axpy run, and a sparse Q4_0 decode agrees with this process's.
    Its own numba cache dir, whose stamp records the VNNI switch, so neither build reuses the other's kernels."""
    import os
    import subprocess
    import sys

    path = make_model("Q4_0", shape="tiny", planted=0.8)
    m = sparserun.load(path, sparsity="threshold:0")
    ids = m.tokenize("The quick brown fox jumps over the lazy dog")
    here = decode_logits(m, ids)
    out = tmp_path / "logits.npy"
    script = ("import sys, numpy as np, sparserun; from sparserun.kernels import quant; "
              "assert not quant.HAS_VNNI; m = sparserun.load(sys.argv[1], sparsity='threshold:0'); m.reset(); "
              f"ids = {list(ids)}; "
              "np.save(sys.argv[2], np.array([m.eval(ids[: i + 1])[-1] for i in range(len(ids))]))")
    env = dict(os.environ, SPARSERUN_NO_VNNI="1", NUMBA_CACHE_DIR=str(tmp_path / "numba"),
               SPARSERUN_CACHE=str(tmp_path / "packs"))
    r = subprocess.run([sys.executable, "-c", script, str(path), str(out)], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    there = np.load(out)
    d = np.abs(there - here) / here.std()
    assert d.max() < 0.05, d.max()  # same int8 activations; the axpy rounds its coefficients on VNNI only
    assert (there.argmax(-1) == here.argmax(-1)).mean() > 0.9


@ONLY_ONE_ROUTE
def test_non_vnni_kquant_model_agrees(make_model, tmp_path):
    """SPARSERUN_NO_VNNI=1 on a Q4_K_M model: the K-quant rows are dotted in integers through the generic kernels
    (not dequantized), with the same sums as the VNNI ones, so the logits match this process's."""
    import os
    import subprocess
    import sys

    path = make_model("Q4_K_M", shape="small", dim=256)
    m = sparserun.load(path)
    ids = m.tokenize("The quick brown fox jumps over the lazy dog")
    here = m.logits(ids)
    out = tmp_path / "logits.npy"
    script = ("import sys, numpy as np, sparserun; from sparserun.kernels import quant; from sparserun.weights import "
              "Weight; assert not quant.HAS_VNNI and quant.X8_MATMUL[quant.Q4_K] is quant.matmul_q4_k_generic; "
              f"m = sparserun.load(sys.argv[1]); np.save(sys.argv[2], m.logits({list(ids)}))")
    env = dict(os.environ, SPARSERUN_NO_VNNI="1", NUMBA_CACHE_DIR=str(tmp_path / "numba"))
    r = subprocess.run([sys.executable, "-c", script, str(path), str(out)], env=env, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    there = np.load(out)
    assert np.abs(there - here).max() < 1e-3 * np.abs(here).max()  # Q4_0-free model: only the K and Q8_0/Q5_0 routes


@pytest.mark.parametrize("arch,qtype,dim", [("qwen2", "F32", 256), ("gemma3", "F32", 256), ("qwen3", "Q5_0", 256),
                                            ("gemma3", "Q4_K_M", 320), ("phi3", "Q4_K_M", 320)], ids=str)
def test_every_policy_runs_on_other_architectures(make_model, arch, qtype, dim):
    """topk, threshold and predictor on the other families' blocks (biases, QK-norm, post-norms, GELU, sliding
    window, phi3's fused tensors and LongRoPE; Q4_K_M at width 320 holds llama.cpp's Q5_0 / Q8_0 fallbacks):
    keeping every neuron gives the dense logits, through the masked dense kernels (topk) and through the neuron
    packs (a predictor naming every neuron, exact on F32 sources; elsewhere the packs' re-quantized down columns
    add their rounding)."""
    from test_parity import ARCH_SHAPES

    path = make_model(qtype, arch=arch, dim=dim, **ARCH_SHAPES[arch])
    dense_model = sparserun.load(path)
    ids = dense_model.tokenize("The quick brown fox jumps over the lazy dog and runs away")
    dense = dense_model.logits(ids)
    scale = np.abs(dense).max()
    np.testing.assert_allclose(decode_logits(sparserun.load(path, sparsity="topk:1.0"), ids), dense, atol=1e-4 * scale)
    n_ff = dense_model.args.n_ff
    every = sparserun.load(path, predictor=lambda layer, acts: [np.arange(n_ff)] * len(acts.x))
    d = np.abs(decode_logits(every, ids) - dense) / dense.std()
    assert d.max() < (1e-3 if qtype == "F32" else 0.35), d.max()
    for spec in ("topk:0.5", "threshold:0.05"):
        got = decode_logits(sparserun.load(path, sparsity=spec), ids)
        assert np.isfinite(got).all() and (got.argmax(1) == dense.argmax(1)).mean() >= 0.5, spec


@pytest.mark.parametrize("qtype", ["Q4_1", "Q5_1", "IQ4_NL", "IQ4_XS", "Q2_K", "Q3_K_M", "Q4_K_M", "Q6_K"])
def test_neuron_packs_of_every_type(make_model, qtype):
    """One predicted 40% of the neurons: decode tokens through the neuron packs (each type's integer row dots on the
    units' gate and up rows, the re-quantized down columns) against a prompt batch of the same sets (the dense
    matmuls, dropped neurons zeroed). The down columns' 4-bit re-quantization (Q4_K downs) costs about 0.03 of the
    logits' std on average, the int8 one about 0.01; a wrong dot would cost the order of the std."""
    path = make_model(qtype, "small")
    n_ff = sparserun.load(path, n_ctx=64).args.n_ff
    keep = np.sort(np.random.default_rng(3).choice(n_ff, int(0.4 * n_ff), replace=False))
    m = sparserun.load(path, n_ctx=64, predictor=lambda li, acts: [keep] * len(acts.x), kv_type="f32")
    ids = m.tokenize("The quick brown fox jumps over the lazy dog and runs away")
    batch = m.logits(ids)
    d = np.abs(decode_logits(m, ids) - batch) / batch.std()
    assert d.max() < 0.35 and d.mean() < 0.05, (d.max(), d.mean())
