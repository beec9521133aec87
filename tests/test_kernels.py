"""Each numba kernel against gguf-py's reference dequantization and numpy matmuls."""
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType as Q, quants

from sparserun.weights import Acts, Weight
from sparserun.gguf_file import RawTensor

TYPES = [Q.F32, Q.F16, Q.BF16, Q.Q4_0, Q.Q8_0, Q.Q5_0, Q.Q4_K, Q.Q5_K, Q.Q6_K]


def random_blocks(qtype, rows, cols, rng):
    """Random bytes in qtype's block layout with sane fp16 scales (random bits would give inf/NaN)."""
    if qtype == Q.F32:
        return rng.standard_normal((rows, cols)).astype(np.float32).view(np.uint8).reshape(-1)
    if qtype == Q.F16:
        return rng.standard_normal((rows, cols)).astype(np.float16).view(np.uint8).reshape(-1)
    if qtype == Q.BF16:
        return quants.quantize(rng.standard_normal((rows, cols)).astype(np.float32), Q.BF16).view(np.uint8).reshape(-1)
    block, nbytes = GGML_QUANT_SIZES[qtype]
    b = rng.integers(0, 256, (rows * cols // block, nbytes), dtype=np.uint8)
    scale = lambda: rng.uniform(0.001, 0.05, len(b)).astype(np.float16).view(np.uint8).reshape(-1, 2)
    if qtype in (Q.Q4_0, Q.Q8_0, Q.Q5_0, Q.IQ4_NL, Q.IQ4_XS):
        b[:, 0:2] = scale()
    elif qtype == Q.Q2_K:
        b[:, 80:82], b[:, 82:84] = scale(), scale()
    elif qtype == Q.Q3_K:
        b[:, 108:110] = scale()
    elif qtype in (Q.Q4_K, Q.Q5_K, Q.Q4_1, Q.Q5_1):  # d and dmin; d and m
        b[:, 0:2], b[:, 2:4] = scale(), scale()
    elif qtype == Q.Q6_K:
        b[:, 208:210] = scale()
    return b.reshape(-1)


def packed(units):
    """units (n, stride) as the flat readonly array the neuron packs are (ffn_pack.load_units): one kernel signature,
    one compile of pack_ffn for the tests and the engine."""
    flat = units.reshape(-1)
    flat.flags.writeable = False
    return flat


def weight(qtype, rows, cols, rng):
    raw = random_blocks(qtype, rows, cols, rng)
    return Weight(RawTensor("w", int(qtype), rows, cols, raw, raw.nbytes // rows))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_dequant_matches_gguf(qtype):
    rng = np.random.default_rng(int(qtype))
    w = weight(qtype, 8, 512, rng)
    ref = quants.dequantize(w.raw.reshape(8, -1) if qtype != Q.F32 else w.raw.view(np.float32), qtype).reshape(8, 512)
    np.testing.assert_array_equal(w.dequantize(), ref)


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("T", [1, 5])
def test_matmul_matches_numpy(qtype, T):
    rng = np.random.default_rng(7)
    rows, cols = 96, 512
    w = weight(qtype, rows, cols, rng)
    x = rng.standard_normal((T, cols)).astype(np.float32)
    W = w.dequantize().astype(np.float64)
    got = w.matmul(Acts(x))
    assert got.shape == (T, rows) and got.dtype == np.float32
    from sparserun.kernels.quant import INT8_TYPES  # Q4_0, Q8_0; Q4_K and Q6_K too through their VNNI dots

    if int(qtype) in INT8_TYPES:
        # the int8 path sees x rounded to int8 blocks (per 256 values as llama.cpp's Q8_K for the K-quants on the
        # VNNI route, Acts.forms_for): exact against that, close to the float product
        _, xd, x8, *_ = Acts(x).forms_for(int(qtype))
        xr = (x8.reshape(T, -1, 32).astype(np.float64) * xd[:, :, None]).reshape(T, cols)
        np.testing.assert_allclose(got, xr @ W.T, rtol=1e-4, atol=1e-4 * np.abs(xr @ W.T).max())
        exact = x.astype(np.float64) @ W.T
        assert np.abs(got - exact).max() < 0.02 * np.abs(exact).max()
    else:
        ref = x.astype(np.float64) @ W.T
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_stacked_matmul_equals_one_call_per_weight(qtype):
    """Matmuls runs q/k/v-like stacks (same type and width, different heights) in one kernel call: each output
    equals that weight's own matmul exactly; a weight of another type in the list gets a call of its own."""
    from sparserun.weights import Matmuls

    rng = np.random.default_rng(11)
    other = Q.Q8_0 if qtype != Q.Q8_0 else Q.F16
    ws = [weight(qtype, 64, 256, rng), weight(qtype, 32, 256, rng), weight(qtype, 32, 256, rng),
          weight(other, 16, 256, rng)]
    for T in (1, 3):
        acts = Acts(rng.standard_normal((T, 256)).astype(np.float32))
        stack = Matmuls(ws)
        assert len(stack.groups) == 2
        outs = stack(acts)
        assert [o.shape for o in outs] == [(T, 64), (T, 32), (T, 32), (T, 16)]
        for w, o in zip(ws, outs):
            assert o.flags.c_contiguous
            np.testing.assert_array_equal(o, w.matmul(acts))


def test_activation_quantization_is_llama_cpp_q8_0():
    """quantize_acts produces what gguf-py's Q8_0 quantizer (a port of llama.cpp's) produces."""
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((3, 256)) * 4).astype(np.float32)
    xq, xd, *_ = Acts(x).forms()
    ref = quants.quantize(x, Q.Q8_0).reshape(3, 8, 34)
    np.testing.assert_array_equal(xd, ref[:, :, :2].copy().view(np.float16)[..., 0].astype(np.float32))
    # gguf-py rounds half away from zero, llama.cpp's AVX path (and ours) to even: ties are rare
    diff = xq.reshape(3, 8, 32).astype(int) - ref[:, :, 2:].view(np.int8).astype(int)
    assert np.abs(diff).max() <= 1 and (diff != 0).mean() < 0.01


def test_transposed_activation_forms():
    """quantize_acts' forms for the repacked Q4_0 dots: xt holds x8 with each whole group of 8 blocks transposed
    in runs of 4 values (run i of block k at 4-byte slot 8 i + k), the rest of the row as it is; xs is -8 times
    each block's sum. 1056 columns: four whole groups and a tail of 1 block."""
    rng = np.random.default_rng(4)
    x = (rng.standard_normal((2, 1056)) * 3).astype(np.float32)
    _, _, x8, _, xt, xs = Acts(x).forms()
    runs = x8[:, :1024].reshape(2, 4, 8, 8, 4)  # (token, group, block k, run i, 4 values)
    np.testing.assert_array_equal(xt[:, :1024].reshape(2, 4, 8, 8, 4), runs.transpose(0, 1, 3, 2, 4))
    np.testing.assert_array_equal(xt[:, 1024:], x8[:, 1024:])
    np.testing.assert_array_equal(xs, -8 * x8.reshape(2, 33, 32).astype(np.int64).sum(axis=2))


@pytest.mark.skipif(not __import__("sparserun.kernels.quant", fromlist=["x"]).HAS_VNNI,
                    reason="this CPU has no AVX512-VNNI (the generic kernels run instead)")
@pytest.mark.parametrize("T,cols", [(1, 1024), (3, 1024), (1, 1056)])
def test_vnni_q4_0_kernels_equal_the_generic_ones(T, cols):
    """The VNNI matmul and neuron-pack dots (used on this CPU) against the generic vpmaddwd kernels on the
    same int8 activations: the same integer dot products, so equal up to float summation order. 1056
    columns: an odd block count (the VNNI dot runs blocks in pairs, then a tail)."""
    from sparserun.kernels import quant as K
    from sparserun.kernels import sparse as S

    rng = np.random.default_rng(3)
    rows = 200
    w = weight(Q.Q4_0, rows, cols, rng)
    acts = Acts(rng.standard_normal((T, cols)).astype(np.float32) * 3)
    xq, xd, x8, xb, xt, xs = acts.forms()
    want = np.empty((T, rows), np.float32)
    K.INT8_MATMUL[Q.Q4_0]((w.raw,), w.row_bytes, np.array([0, rows]), x8, xd, xb, want)
    got = np.empty((T, rows), np.float32)
    K.matmul_q4_0_vnni((w.raw,), w.row_bytes, np.array([0, rows]), x8, xd, xb, got)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    # a neuron pack with w as the gate and up rows and float32 down columns, gate . x and up . x by both kernels
    dim = 64
    down = rng.standard_normal((rows, dim)).astype(np.float32)
    units = np.concatenate([w.raw.reshape(rows, -1), w.raw.reshape(rows, -1), down.view(np.uint8)], axis=1)
    idx = np.sort(rng.choice(rows, 37, replace=False)).astype(np.int64)
    outs = []
    for vnni, n_parts in ((False, 1), (True, 3)):  # any number of partial sums splits the neurons correctly
        out = np.empty(dim, np.float32)
        S.pack_ffn(packed(units), units.shape[1], w.row_bytes, 2 * w.row_bytes, Q.Q4_0, Q.Q4_0, vnni, S.DOWN_F32,
                   dim, idx, 37, np.empty(0, np.float32), S.GATED_DOTS, 1, acts.x[:1],
                   np.full((n_parts, dim), np.nan, np.float32), out)
        outs.append(out)
    d = want[0, idx]
    ref = (np.maximum(d, 0) * d) @ down[idx]  # relu(gate . x) * (up . x)
    np.testing.assert_allclose(outs[1], outs[0], rtol=1e-5, atol=1e-5 * np.abs(ref).max())
    np.testing.assert_allclose(outs[0], ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


@pytest.mark.parametrize("n", [1, 8, 37, 64])
def test_f32_row_dot_any_length_and_offset(n):
    """dot_row_f32 reads float32 at any byte offset (pack units are byte arrays) and handles a tail under 8."""
    from sparserun.kernels.simd import dot_row_f32
    from numba import njit

    rng = np.random.default_rng(n)
    w, x = rng.standard_normal(n).astype(np.float32), rng.standard_normal((1, n)).astype(np.float32)
    raw = np.concatenate([np.zeros(3, np.uint8), w.view(np.uint8)])  # off by 3 bytes: unaligned
    got = njit(lambda raw, x: dot_row_f32(raw, 3, x.shape[1], x))(raw, x)
    assert abs(got - float(w @ x[0])) <= 1e-5 * (1 + np.abs(w * x[0]).sum())


def test_fast_exp_and_activations_match_float64():
    """ops.fast_exp (a polynomial, so loops over it vectorize) within 2e-7 relative of exp on its range, and the
    FFN activations built on it against float64 formulas, extremes included."""
    from numba import njit

    from sparserun.kernels import ops

    x = np.linspace(-87, 88, 200_001).astype(np.float32)
    got = njit(lambda x: np.array([ops.fast_exp(v) for v in x]))(x)
    ref = np.exp(x.astype(np.float64))
    assert (np.abs(got - ref) / ref).max() < 2e-7
    g = (np.random.default_rng(0).standard_normal((2, 999)) * 3).astype(np.float32)
    g[0, :6] = [0, 1e-6, -1e-6, 40, -40, -100]
    u = np.random.default_rng(1).standard_normal((2, 999)).astype(np.float32)
    gd = g.astype(np.float64)
    h = g.astype(np.float16).astype(np.float64)  # GELU as ggml's table: input and value rounded to half
    gelu = (0.5 * h * (1 + np.tanh(0.7978845608 * h * (1 + 0.044715 * h * h)))).astype(np.float16).astype(np.float64)
    gelu = np.where(gd <= -10, 0.0, np.where(gd >= 10, gd, gelu))
    refs = {0: gd / (1 + np.exp(-gd)), 1: np.maximum(gd, 0), 2: gelu}
    for act, r in refs.items():
        rtol = 1e-3 if act == 2 else 1e-5  # the half rounding of a value computed in float32 may land a half-ulp away
        out = np.empty_like(g)
        ops.ffn_activate(g, u, act, out)
        np.testing.assert_allclose(out, r * u, rtol=rtol, atol=1e-6)
        ops.ffn_activate(g[:0], g, act, out)  # non-gated: act(u) with u = g
        np.testing.assert_allclose(out, r, rtol=rtol, atol=1e-6)


def test_f16_cache_rounds_as_numpy():
    """ops.store_kv into an f16 cache: numpy's float16 rounding (to nearest even) for ties, subnormals, overflow."""
    from sparserun.kernels import ops

    x = np.array([0.0, -0.0, 1.0, 1 + 2**-11, 1 + 3 * 2**-11, 65504, 65519, 65520, 1e6, -1e6, 6e-5, 3e-6, 1e-8,
                  -2.9802322e-08, 3.14159], np.float32)
    rng = np.random.default_rng(0)
    x = np.concatenate([x, (rng.standard_normal(4001) * 10.0 ** rng.integers(-9, 6, 4001)).astype(np.float32)])
    ks, vs = ops.kv_shapes(1, 1, len(x))
    kc, vc = np.zeros(ks, np.uint16), np.zeros(vs, np.uint16)
    ops.store_kv(x[None], -x[None], kc, vc, 0)
    with np.errstate(over="ignore"):  # numpy warns where it rounds to inf, as it should
        np.testing.assert_array_equal(kc[0, 0, :, 0], x.astype(np.float16).view(np.uint16))
        np.testing.assert_array_equal(vc[0, 0], (-x).astype(np.float16).view(np.uint16))


@pytest.mark.parametrize("kv_type", ["f16", "f32"])
@pytest.mark.parametrize("n_head, n_kv, hd, T, pos0, threads", [(8, 2, 16, 1, 0, 2), (8, 2, 16, 1, 37, 2),
                                                                 (4, 4, 8, 5, 11, 2), (6, 1, 8, 3, 0, 1),
                                                                 (8, 1, 16, 1, 20, 2), (8, 1, 16, 1, 5, 8),
                                                                 (6, 2, 16, 1, 9, 4), (4, 2, 64, 9, 100, 2),
                                                                 (8, 2, 128, 2, 60, 2), (12, 4, 24, 1, 33, 2),
                                                                 (16, 2, 32, 1, 40, 2), (24, 2, 16, 3, 10, 2),
                                                                 (2, 2, 12, 2, 7, 2)])
def test_attention_matches_float64_softmax(n_head, n_kv, hd, T, pos0, threads, kv_type):
    """ops.store_kv + ops.attention against causal GQA softmax attention in float64: single tokens, batches with the
    causal mask inside them, MHA, MQA (one kv head: its query heads split across threads, into up to 8 shares: the
    kernel is told the thread count, numba runs what this machine has), 64- and 128-wide heads; an f16 cache holds
    numpy's float16 rounding of every key and value, and the reference reads those. Widths 8-128 take the vector
    blocks (8, 4 and 1 queries a call: groups of 8, 12 = 8 + 4, 4, 3 = 1 + 1 + 1; 1, 2 or 4 value vectors a pass),
    width 12 the plain loop."""
    import numba

    from sparserun.kernels import ops

    rng = np.random.default_rng(pos0 + 7 * T)
    n_ctx = pos0 + T + 3
    dt = ops.KV_TYPES[kv_type]
    ks, vs = ops.kv_shapes(n_kv, n_ctx, hd)
    kc, vc = np.zeros(ks, dt), np.zeros(vs, dt)
    keys = (rng.standard_normal((pos0 + T, n_kv * hd)) * 2).astype(np.float32)
    vals = rng.standard_normal((pos0 + T, n_kv * hd)).astype(np.float32)
    ops.store_kv(keys[:pos0], vals[:pos0], kc, vc, 0)  # the context already cached, then the batch
    ops.store_kv(keys[pos0:], vals[pos0:], kc, vc, pos0)
    as_f32 = (lambda c: c.view(np.float16).astype(np.float32)) if kv_type == "f16" else (lambda c: c)
    if kv_type == "f16":
        keys, vals = keys.astype(np.float16).astype(np.float32), vals.astype(np.float16).astype(np.float32)
    # the cache holds exactly these (numpy's float16 rounding for f16): keys in transposed blocks of positions
    stored_k = as_f32(kc).transpose(1, 3, 0, 2).reshape(-1, n_kv * hd)[:pos0 + T]
    np.testing.assert_array_equal(stored_k, keys)
    np.testing.assert_array_equal(as_f32(vc)[:, :pos0 + T].transpose(1, 0, 2).reshape(pos0 + T, -1), vals)
    poison = np.float16(1e4).view(np.uint16) if kv_type == "f16" else 1e4
    for p in range(pos0 + T, ks[1] * ks[3]):  # positions past the batch (and the last block's padding) unread
        kc[:, p // ks[3], :, p % ks[3]] = poison
    vc[:, pos0 + T:] = poison
    q = (rng.standard_normal((T, n_head * hd)) * 2).astype(np.float32)
    out = np.empty_like(q)
    old = numba.get_num_threads()
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    try:
        ops.attention(q, kc, vc, pos0, n_head, threads, out)
    finally:
        numba.set_num_threads(old)
    G = n_head // n_kv
    for t in range(T):
        n = pos0 + t + 1
        for h in range(n_head):
            g = h // G
            k, v = keys[:n, g * hd:(g + 1) * hd].astype(np.float64), vals[:n, g * hd:(g + 1) * hd].astype(np.float64)
            qs = q[t, h * hd:(h + 1) * hd] * np.float32(1 / np.sqrt(hd))
            if kv_type == "f16":  # scaled queries and probabilities rounded to half, as llama.cpp's F16 mul_mat
                qs = qs.astype(np.float16)
            s = k @ qs.astype(np.float64)
            p = np.exp(s - s.max())
            p /= p.sum()
            if kv_type == "f16":
                p = p.astype(np.float16).astype(np.float64)
            np.testing.assert_allclose(out[t, h * hd:(h + 1) * hd], p @ v, rtol=1e-4, atol=1e-5)


def _up_row_packs(w, r, rng, acts=None):
    """pack_ffn (COEF_TIMES_DOT, float32 down columns) of 4 neurons of 40 whose up rows are w's, then r's (its
    repacked copy): the two outputs, which should agree, the down columns and the neurons."""
    from sparserun.kernels import quant as K
    from sparserun.kernels import sparse as S

    acts = acts or Acts(rng.standard_normal((1, w.cols)).astype(np.float32))
    down = rng.standard_normal((40, 32)).astype(np.float32)
    idx = np.array([1, 5, 6, 30], np.int64)
    outs = []
    for src in (w, r):
        units = np.concatenate([src.raw.reshape(40, -1), down.view(np.uint8)], axis=1)
        out = np.empty(32, np.float32)
        S.pack_ffn(packed(units), units.shape[1], 0, src.row_bytes, src.qtype, src.qtype, K.HAS_VNNI, S.DOWN_F32,
                   32, idx, 4, np.ones(4, np.float32), S.COEF_TIMES_DOT, 1, acts.x, np.empty((2, 32), np.float32), out)
        outs.append(out)
    return outs, down, idx


@pytest.mark.parametrize("cols", [256, 1056, 96])
def test_repacked_q4_0_equals_the_gguf_layout(cols):
    """Weight.repacked (8 blocks' scales, then their quants; 1056 and 96 columns end in a shorter group), on this
    CPU's route: the same dequantized values, the same matmul up to float rounding (the same exact int32 block dots;
    a whole group's 8 block dots meet their scales in one FMA, simd._q4_0r_group_sums), batch tiles bit-identical to
    one token at a time, row subsets exactly the rows' results, and the same neuron-pack up dots."""
    from sparserun.ffn_pack import down_kind
    from sparserun.kernels import quant as K
    from sparserun.kernels import sparse as S

    assert down_kind(K.Q4_0R) == down_kind(K.Q4_0) == S.DOWN_Q4  # a repacked down matrix still packs 4-bit columns
    rng = np.random.default_rng(cols)
    w = weight(Q.Q4_0, 40, cols, rng)
    r = w.repacked()
    assert r.type_name == "Q4_0R" and r.raw.nbytes == w.raw.nbytes and not np.array_equal(r.raw, w.raw)
    np.testing.assert_array_equal(r.dequantize(), w.dequantize())
    for T in (1, 3, 2 * K.TOKENS + 1):  # one token, leftover tokens only, then tiles and a leftover
        x = rng.standard_normal((T, cols)).astype(np.float32)
        ref, got = w.matmul(Acts(x)), r.matmul(Acts(x))
        np.testing.assert_allclose(got, ref, rtol=2e-6, atol=2e-6 * np.abs(ref).max())
        np.testing.assert_array_equal(got, np.concatenate([r.matmul(Acts(x[t:t + 1])) for t in range(T)]))
    ids = np.array([3, 0, 39, 17])
    acts = Acts(rng.standard_normal((1, cols)).astype(np.float32))
    np.testing.assert_array_equal(r.subset(ids).matmul(acts), r.matmul(acts)[:, ids])
    # a pack whose up rows are the repacked rows: COEF_TIMES_DOT gives the GGUF rows' result
    outs, down, idx = _up_row_packs(w, r, rng, acts)
    np.testing.assert_allclose(outs[1], outs[0], rtol=1e-6, atol=1e-6 * np.abs(outs[0]).max())
    # predictor packs (gate and up rows): repacked rows are interleaved (ffn_pack.interleave_rows) and take the
    # paired dot (dot_gate_up_q4_0r_vnni), the GGUF rows one dot each; silu(gate . x) * (up . x) alike
    from sparserun.ffn_pack import interleave_rows

    g = weight(Q.Q4_0, 40, cols, rng)
    outs = []
    for gate, up in ((g, w), (g.repacked(), r)):
        rows = [gate.raw.reshape(40, -1), up.raw.reshape(40, -1)]
        if gate.qtype == K.Q4_0R:
            rows = [interleave_rows(*rows)]
        units = np.concatenate(rows + [down.view(np.uint8)], axis=1)
        out = np.empty(32, np.float32)
        S.pack_ffn(packed(units), units.shape[1], gate.row_bytes, gate.row_bytes + up.row_bytes, gate.qtype,
                   up.qtype, K.HAS_VNNI, S.DOWN_F32, 32, idx, 4, np.empty(0, np.float32), S.GATED_DOTS, 0, acts.x,
                   np.empty((2, 32), np.float32), out)
        outs.append(out)
    gd, ud = g.matmul(acts)[0, idx], w.matmul(acts)[0, idx]
    want = (gd / (1 + np.exp(-gd)) * ud) @ down[idx]
    np.testing.assert_allclose(outs[1], outs[0], rtol=1e-6, atol=1e-6 * np.abs(outs[0]).max())
    np.testing.assert_allclose(outs[1], want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("route", ["vnni", "generic"])
def test_interleaved_gate_up_dots_equal_single_ones(route):
    """dot_gate_up_q4_0r (both routes: the VNNI one where this CPU has it) on rows interleaved by
    ffn_pack.interleave_rows: each of its two results is bit-identical to the one-row dot of that row (rows of whole
    groups, with a tail group, and of a tail group only), with or without its prefetch of another pair, and the
    interleaved bytes are the two rows' bytes. The generic route's one-row dots are the VNNI route's bit for bit."""
    from numba import njit

    from sparserun.ffn_pack import interleave_rows
    from sparserun.kernels import quant as K
    from sparserun.kernels import simd

    if route == "vnni" and not K.HAS_VNNI:
        pytest.skip("this CPU has no AVX512-VNNI")
    if route == "vnni":
        gate_up, row_dot = simd.dot_gate_up_q4_0r_vnni, simd.dot_row_q4_0r_vnni
    else:
        gate_up, row_dot = simd.dot_gate_up_q4_0r_generic, simd.dot_row_q4_0r_generic

    @njit
    def dots(pairs, raw, rows, rb, nb, xt, xd, xs):
        out = np.empty((rows, 3), np.float32)  # (gate of the pair, up of the pair, gate alone)
        for r in range(rows):
            # odd rows also prefetch the next pair's lines, as pack_ffn does: results must not change
            pf = ((r + 1) % rows) * 2 * rb if r % 2 else -1
            out[r, 0], out[r, 1] = gate_up(pairs, r * 2 * rb, nb, xt, 0, xd, xs, 0, pf, 3)
            out[r, 2] = row_dot(raw, r * rb, nb, xt, 0, xd, xs, 0)
        return out

    rng = np.random.default_rng(11)
    for cols in (2048, 1056, 96):
        w = weight(Q.Q4_0, 9, cols, rng).repacked()
        rows = w.raw.reshape(9, w.row_bytes)
        pairs = interleave_rows(rows, rows[::-1].copy())  # neuron r: gate row r, up row 8 - r
        assert pairs.shape == (9, 2 * w.row_bytes)
        np.testing.assert_array_equal(np.sort(pairs, axis=1), np.sort(np.concatenate([rows, rows[::-1]], 1), axis=1))
        acts = Acts(rng.standard_normal((1, cols)).astype(np.float32))
        _, xd, _, _, xt, xs = acts.forms()
        out = dots(pairs.reshape(-1), w.raw, 9, w.row_bytes, cols // 32, xt, xd, xs)
        np.testing.assert_array_equal(out[:, 2], w.matmul(acts)[0])  # the matmul's own row dots
        np.testing.assert_array_equal(out[:, 0], out[:, 2])
        np.testing.assert_array_equal(out[:, 1], out[::-1, 2])


def test_weights_in_memory_together_run_as_one_array():
    """in_memory_together puts q/k/v-like weights back to back in one buffer; Matmuls then hands the kernel one
    array (weights.joined) and every output equals that weight's own repacked matmul exactly. Slices that are
    not back to back, or not in order, stay separate arrays."""
    from sparserun.weights import Matmuls, in_memory_together, joined

    rng = np.random.default_rng(12)
    ws = [weight(Q.Q4_0, 64, 256, rng), weight(Q.Q4_0, 32, 256, rng), weight(Q.Q4_0, 16, 256, rng)]
    together = in_memory_together(ws)
    stack = Matmuls(together)
    assert len(stack.groups) == 1 and len(stack.groups[0][1]) == 1  # one raw array for the kernel
    for T in (1, 3):
        acts = Acts(rng.standard_normal((T, 256)).astype(np.float32))
        for w, got in zip(ws, stack(acts)):
            np.testing.assert_array_equal(got, w.repacked().matmul(acts))
    raws = [w.raw for w in together]
    assert joined(raws[::-1]) is None and joined([raws[0], raws[2]]) is None and joined(raws[:1]) is None
    assert joined([w.repacked().raw for w in ws]) is None  # separate buffers
    one = joined(raws)
    assert one.nbytes == sum(r.nbytes for r in raws) and not one.flags.writeable


@pytest.mark.skipif(not __import__("sparserun.kernels.quant", fromlist=["x"]).HAS_VNNI,
                    reason="the batch matmuls are VNNI kernels")
@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q8_0, Q.Q5_0, Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q4_1, Q.Q5_1, Q.Q2_K, Q.Q3_K,
                                   Q.IQ4_NL, Q.IQ4_XS], ids=lambda t: t.name)
def test_batch_matmul_tiles_equal_one_token_at_a_time(qtype):
    """A batch through a VNNI batch matmul (matmul_q4_0r_vnni on repacked Q4_0, matmul_q8_0_vnni, the K-quants': tiles of
    ROW_TILE rows, TOKENS tokens per dot_tokens call, then the leftover tokens one by one) is bit-identical to
    each token's own matmul: two weights in separate buffers (two raw arrays for one kernel call), 1056 columns
    (a tail group), 40 + 24 rows (a partial row tile), batches with and without leftover tokens. Repacked Q4_0
    and Q8_0 equal the GGUF layout's and the generic kernels up to float summation order (the integer block dots are
    exact in both). The K-quants: 2304 columns (9 super-blocks: two column ranges, K_COLUMNS)."""
    from sparserun.kernels import quant as K
    from sparserun.weights import Matmuls

    rng = np.random.default_rng(13)
    cols = 2304 if GGML_QUANT_SIZES[qtype][0] == 256 else 1056
    assert cols // 32 > K.K_COLUMNS or cols < 2048
    ws = [weight(qtype, 40, cols, rng), weight(qtype, 24, cols, rng)]
    rs = [w.repacked() for w in ws] if qtype in (Q.Q4_0, Q.Q4_K, Q.Q5_K, Q.Q6_K) else ws
    if qtype in (Q.Q4_K, Q.Q5_K, Q.Q6_K):  # the GGUF layout's batch, too
        gg = Matmuls(ws)(Acts(rng.standard_normal((K.TOKENS + 1, cols)).astype(np.float32)))
        assert gg[0].shape == (K.TOKENS + 1, 40)
    stack = Matmuls(rs)
    assert len(stack.groups) == 1 and len(stack.groups[0][1]) == 2 and 40 + 24 > K.ROW_TILE
    for T in (K.TOKENS, K.TOKENS + 1, 2 * K.TOKENS + 3):
        x = rng.standard_normal((T, cols)).astype(np.float32)
        acts = Acts(x)
        for w, r, got in zip(ws, rs, stack(acts)):
            one = np.concatenate([r.matmul(Acts(x[t:t + 1])) for t in range(T)])
            np.testing.assert_array_equal(got, one)
            if qtype == Q.Q4_0:
                gguf = w.matmul(acts)
                np.testing.assert_allclose(got, gguf, rtol=2e-6, atol=2e-6 * np.abs(gguf).max())
            elif qtype in (Q.Q8_0, Q.Q5_0):  # the VNNI route against the generic one (Q8_0's int16 dot)
                xq, xd, x8, xb, *_ = acts.forms()
                generic = np.empty_like(got)
                K.INT8_MATMUL[int(qtype)]((w.raw,), w.row_bytes, np.array([0, w.rows]), xq if qtype == Q.Q8_0 else x8,
                                          xd, xb, generic)
                np.testing.assert_allclose(got, generic, rtol=1e-5, atol=1e-6 * np.abs(generic).max())


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q4_1, Q.Q5_1, Q.Q2_K, Q.Q3_K, Q.IQ4_NL, Q.IQ4_XS],
                         ids=lambda t: t.name)
def test_generic_x8_dots_equal_the_vnni_ones(qtype):
    """The route for CPUs without AVX512-VNNI of the K-quants, Q4_1 / Q5_1 and the IQ4s (matmul_*_generic: vpdpbusd's
    arithmetic in generic vector IR, IQ4's level lookup as selects) against numpy on the same int8-rounded
    activations (Q8_K's for the K-quants and IQ4_XS, Q8_0's blocks for the others, as llama.cpp rounds them), and,
    where this CPU has VNNI, bit for bit against the vpdpbusd kernels (IQ4's lookup a vpshufb there): one token and
    batches with leftover tokens."""
    from sparserun.kernels import quant as K

    rng = np.random.default_rng(21)
    w = weight(qtype, 40, 1280, rng)
    name = qtype.name.lower()
    generic, vnni = getattr(K, f"matmul_{name}_generic"), getattr(K, f"matmul_{name}_vnni")
    values = w.dequantize().astype(np.float64)
    for T in (1, K.TOKENS + 1):
        x = rng.standard_normal((T, 1280)).astype(np.float32)
        if int(qtype) in K.Q8K_TYPES:
            _, xd, x8, xb, _, _ = K.acts_forms_k(x)
        else:
            _, xd, x8, xb, _, _ = K.acts_forms(x)
        got = np.empty((T, 40), np.float32)
        generic((w.raw,), w.row_bytes, np.array([0, w.rows]), x8, xd, xb, got)
        ref = (x8.astype(np.float64) * np.repeat(xd, 32, axis=1)) @ values.T
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
        if K.HAS_VNNI:
            want = np.empty_like(got)
            vnni((w.raw,), w.row_bytes, np.array([0, w.rows]), x8, xd, xb, want)
            np.testing.assert_array_equal(got, want)


def test_q8_k_rounding_is_llama_cpps_ties_included():
    """quantize_acts_k against llama.cpp's quantize_row_q8_K in numpy: the scale from the value of largest magnitude,
    the first one where several share it (whatever their signs), values rint(x * -127 / max) capped at 127; a zero
    super-block gives zeros."""
    from sparserun.kernels import quant as K

    rng = np.random.default_rng(5)
    x = rng.standard_normal((4, 1024)).astype(np.float32)
    x[1, 5], x[1, 100] = -9.0, 9.0  # a tie of both signs: the first (negative) decides
    x[1, 256 + 3], x[1, 256 + 7] = 8.0, -8.0  # and the other way round
    x[1, 512 + 10], x[1, 512 + 20] = 7.0, 7.0  # a tie of one sign
    x[2, 768:] = 0.0
    x[3, :256] = -0.0
    _, xd, x8, _, _, _ = K.acts_forms_k(x)
    for t in range(len(x)):
        for sb in range(x.shape[1] // 256):
            v = x[t, 256 * sb:256 * (sb + 1)]
            a = np.abs(v)
            if a.max() == 0:
                assert (x8[t, 256 * sb:256 * (sb + 1)] == 0).all() and xd[t, 8 * sb] == 0
                continue
            iscale = np.float32(-127.0) / v[int(np.argmax(a))]  # argmax: the first maximum
            want = np.minimum(127, np.rint(iscale * v).astype(np.int32))
            np.testing.assert_array_equal(x8[t, 256 * sb:256 * (sb + 1)], want)
            assert xd[t, 8 * sb] == np.float32(1.0) / iscale


def test_activation_rounding_survives_a_fastmath_caller(tmp_path):
    """numba compiles a kernel's callees with the caller's flags: quantize_acts first compiled inside a fastmath
    kernel (as select_pack_ffn calls it) must still round to nearest, there and in later direct calls. A
    fresh process and numba cache, so the first compilation is the fastmath one (an add-and-subtract rounding
    trick was folded into truncation there)."""
    import os
    import subprocess
    import sys

    script = """if True:
        import numpy as np
        from numba import njit
        from sparserun.kernels import quant as K
        x = (np.random.default_rng(0).standard_normal((1, 1024)) * 3).astype(np.float32)
        forms = lambda: [np.empty((1, 1024), np.int16), np.empty((1, 32), np.float32), np.empty((1, 1024), np.int8),
                         np.empty((1, 256), np.int32), np.empty((1, 1024), np.int8), np.empty((1, 32), np.int32)]
        @njit(fastmath=True)
        def caller(x, a, b, c, d, e, f):
            K.quantize_acts(x, a, b, c, d, e, f)
        inside, direct = forms(), forms()
        caller(x, *inside)
        K.quantize_acts(x, *direct)
        xb = x.reshape(32, 32)
        ref = np.rint(xb * (np.float32(1) / (np.abs(xb).max(1, keepdims=True) / np.float32(127)))).reshape(1, 1024)
        print((inside[0] != ref).mean(), (direct[0] != ref).mean())
    """
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "numba"))
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    inside, direct = map(float, r.stdout.split())
    assert inside < 0.005 and direct < 0.005, (inside, direct)  # ties and the fp16-rounded scale aside


def test_generic_kernels_build_for_aarch64(monkeypatch):
    """The route for CPUs without VNNI is generic LLVM vector IR, so it must build for ARM: the generic row dots
    (K-quants, repacked K-quants and Q4_0, the paired gate/up dot, Q4_0, Q5_0, Q4_1, Q8_0, IQ4_NL, IQ4_XS, the hot
    head's Q4_0 tile) are compiled here
    into a function's LLVM IR, then llvmlite emits AArch64 object code from it (x86 target attributes stripped). The
    repacked dots', Q4_0's, Q5_0's and the tile's dots take AVX2's pmaddubsw on x86 hosts: their portable form
    (what a non-x86 build emits) is the one checked, and their x86 form is checked to sum the same
    (test_repacked_dots_in_portable_ir_equal_the_avx2_form, test_generic_q4_0_q5_0_matmuls). Checked: code
    generation for aarch64. Not run: the code itself on ARM."""
    import re

    import llvmlite.binding as llvm
    from numba import njit

    from sparserun.kernels import simd

    for module in (simd.ir, simd.legacy):
        monkeypatch.setattr(module, "X86_AVX2", False)  # read at code generation: dots below is compiled here

    @njit(_nrt=False)  # no reference counting: its helpers are numba's runtime, x86 atomics once optimized here
    def dots(w, x8, xd, xb, xq, bias, out):
        a = simd.dot_row_q4_k_generic(w, 0, 8, x8, 0, xd, xb, 0) + simd.dot_row_q6_k_generic(w, 0, 8, x8, 0, xd, xb, 0)
        a += simd.dot_row_q4_kr_generic(w, 0, 8, x8, 0, xd, xb[0], 0) + simd.dot_row_q6_kr_generic(w, 0, 8, x8, 0, xd,
                                                                                                   xb[0], 0)
        a += simd.dot_row_q5_kr_generic(w, 0, 8, x8, 0, xd, xb[0], 0) + simd.dot_row_q4_0r_generic(w, 0, 9, x8, 0, xd,
                                                                                                   xb[0], 0)
        a += simd.dot_row_q3_kr_generic(w, 0, 8, x8, 0, xd, xb[0], 0) + simd.dot_row_q2_krk_generic(w, 0, 8, x8, 0, xd,
                                                                                                    xb[0], 0)
        a += simd.dot_row_iq4_xsr_generic(w, 0, 8, x8, 0, xd, xb[0], 0) + simd.dot_row_iq4_nlr_generic(w, 0, 9, x8, 0, xd,
                                                                                                      xb[0], 0)
        g, u = simd.dot_gate_up_q4_0r_generic(w, 0, 8, x8[0], 0, xd, xb[0], 0, -1, 0)
        a += g + u
        t = simd.dot_tokens_q5_k_generic(w, 0, 8, x8, 0, 256, xd, xb, 0, 8)
        b = simd.dot_row_q3_k_generic(w, 0, 8, x8, 0, xd, xb, 0) + simd.dot_row_iq4_xs_generic(w, 0, 8, x8, 0, xd, xb, 0)
        b += simd.dot_row_q4_1_generic(w, 0, 8, x8, 0, xd, xb, 0) + simd.dot_row_iq4_nl_generic(w, 0, 8, x8, 0, xd, xb, 0)
        b += simd.dot_row_q4_0_generic(w, 0, 8, x8, 0, xd, xb, 0) + simd.dot_row_q5_0_generic(w, 0, 8, x8, 0, xd, xb, 0)
        simd.dot_tile_q4_0_generic(w, 0, 4, x8[0], xd[0], bias, out, 0)  # the hot head's estimate
        return a + b + t[0] + simd.dot_row_q8_0(w, 0, 8, xq, 0, xd, 0) + out[0]

    args = (np.zeros(4096, np.uint8), np.zeros((8, 256), np.int8), np.ones((8, 8), np.float32),
            np.zeros((8, 64), np.int32), np.zeros((8, 256), np.int16), np.zeros(4, np.int32), np.zeros(8, np.float32))
    dots(*args)
    text = dots.inspect_llvm(dots.signatures[0])
    assert "vpdpbusd" not in text and "llvm.x86" not in text  # nothing x86-only in the generic route
    text = re.sub(r'"target-(cpu|features)"="[^"]*"', "", text)
    text = re.sub(r"^target (datalayout|triple) = .*$", "", text, flags=re.M)
    llvm.initialize_all_targets()
    llvm.initialize_all_asmprinters()
    tm = llvm.Target.from_triple("aarch64-unknown-linux-gnu").create_target_machine(opt=2)
    mod = llvm.parse_assembly(text)
    mod.triple, mod.data_layout = "aarch64-unknown-linux-gnu", str(tm.target_data)
    mod.verify()
    obj = tm.emit_object(mod)
    assert len(obj) > 1000 and obj[:4] == b"\x7fELF"
    assembly = tm.emit_assembly(mod)
    assert re.search(r"\tsmull2?\t", assembly) and re.search(r"\taddp\t", assembly)  # NEON widening multiplies, pairwise adds


def test_repacked_dots_in_portable_ir_equal_the_avx2_form(monkeypatch):
    """The repacked K-quants' and Q4_0's generic dots in portable IR (a non-x86 build's) sum exactly what their x86
    form (pmaddubsw) sums: one row of each type against random activations, as the neuron packs call them (Q4_0: 9
    blocks, a whole group and a tail block)."""
    from numba import njit

    from sparserun.kernels import simd
    from sparserun.weights import Acts

    def row_dots(w4, w5, w6, w3, w2, wi, w0, xt, xd, xs):
        return (simd.dot_row_q4_kr_generic(w4, 0, 8, xt, 0, xd, xs, 0), simd.dot_row_q5_kr_generic(w5, 0, 8, xt, 0, xd, xs, 0),
                simd.dot_row_q6_kr_generic(w6, 0, 8, xt, 0, xd, xs, 0), simd.dot_row_q3_kr_generic(w3, 0, 8, xt, 0, xd, xs, 0),
                simd.dot_row_q2_kr_generic(w2, 0, 8, xt, 0, xd, xs, 0), simd.dot_row_iq4_xsr_generic(wi, 0, 8, xt, 0, xd, xs, 0),
                simd.dot_row_q4_0r_generic(w0, 0, 9, xt, 0, xd, xs, 0))

    rng = np.random.default_rng(5)
    rows = [weight(q, 1, 256, rng).repacked().raw for q in (Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q3_K, Q.Q2_K, Q.IQ4_XS)]
    rows.append(weight(Q.Q4_0, 1, 288, rng).repacked().raw)
    x = rng.standard_normal((1, 288)).astype(np.float32)
    _, xd, _, _, xt, xs = Acts(x).forms()  # (the K-quant rows read the first 256 values)
    fh, avx2 = njit(row_dots), simd.ir.X86_AVX2
    host = fh(*rows, xt, xd, xs)
    monkeypatch.setattr(simd.ir, "X86_AVX2", False)  # read at code generation (ir._dots)
    fp = njit(row_dots)
    portable = fp(*rows, xt, xd, xs)
    assert host == portable and all(np.isfinite(host)) and min(map(abs, host)) > 0
    assert "pmadd.ub.sw" not in fp.inspect_llvm(fp.signatures[0])
    assert ("pmadd.ub.sw" in fh.inspect_llvm(fh.signatures[0])) == avx2


@pytest.mark.parametrize("cols", [1056, 96])
def test_repacked_iq4_nl_equals_the_gguf_layout(cols, monkeypatch):
    """IQ4_NL repacked at load in Q4_0R's layout (IQ4_NLR: the same block geometry, each nibble a level; 1056 and 96
    columns end in a shorter group): the same dequantized values; the matmul equal to the GGUF-layout one up to float
    rounding (the same exact int32 block dots); batch tiles bit-identical to one token at a time; the portable IR
    (levels + 128 by selects, vpdpbusd's arithmetic widened) bit for bit the AVX2 form (vpshufb, pmaddubsw on signed
    bytes); a neuron pack of repacked up rows the GGUF rows' pack."""
    from numba import njit

    from sparserun.kernels import quant as K
    from sparserun.kernels import simd
    
    rng = np.random.default_rng(cols + 1)
    w = weight(Q.IQ4_NL, 40, cols, rng)
    r = w.repacked()
    assert r.type_name == "IQ4_NLR" and r.raw.nbytes == w.raw.nbytes and not np.array_equal(r.raw, w.raw)
    np.testing.assert_array_equal(r.dequantize(), w.dequantize())
    for T in (1, 3, 2 * K.TOKENS + 1):
        x = rng.standard_normal((T, cols)).astype(np.float32)
        ref, got = w.matmul(Acts(x)), r.matmul(Acts(x))
        np.testing.assert_allclose(got, ref, rtol=2e-6, atol=2e-6 * np.abs(ref).max())
        np.testing.assert_array_equal(got, np.concatenate([r.matmul(Acts(x[t:t + 1])) for t in range(T)]))
    _, xd, _, _, xt, xs = Acts(rng.standard_normal((1, cols)).astype(np.float32)).forms()

    def row_dots(raw, xt, xd, xs, out):
        for i in range(out.shape[0]):
            out[i] = simd.dot_row_iq4_nlr_generic(raw, i * (raw.shape[0] // out.shape[0]), xt.shape[1] // 32, xt, 0, xd, xs, 0)

    results = []
    for avx2 in (simd.ir.X86_AVX2, False):
        monkeypatch.setattr(simd.ir, "X86_AVX2", avx2)  # read at code generation (ir._route_dp)
        out = np.empty(40, np.float32)
        njit(row_dots)(r.raw, xt, xd, xs, out)
        results.append(out)
    np.testing.assert_array_equal(results[0], results[1])
    monkeypatch.undo()
    outs = _up_row_packs(w, r, rng)[0]
    np.testing.assert_allclose(outs[1], outs[0], rtol=1e-5, atol=1e-5 * np.abs(outs[0]).max())


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.IQ4_NL, Q.IQ4_XS], ids=lambda t: t.name)
def test_signed_weight_dots_on_avx2_equal_the_portable_form(qtype, monkeypatch):
    """The types whose VNNI dots multiply weights + 128 (Q8_0, IQ4_NL, IQ4_XS) take AVX2's pmaddubsw on signed bytes on
    the generic route of x86 (ir._dpbssd_avx2: the weights as they are, no offset; IQ4's levels looked up by vpshufb):
    their one-token and batch dots equal, bit for bit, the portable form (vpdpbusd's arithmetic widened, the levels by
    16 selects) and numpy on the int8-rounded activations; a batch in tiles equals one token at a time. A Q8_0 row
    holding -128 (llama.cpp's quantizer never writes it; a file may) is summed exactly too."""
    from numba import njit

    from sparserun.kernels import simd

    rng = np.random.default_rng(9)
    raw = random_blocks(qtype, 8, 512, rng).copy()
    if qtype == Q.Q8_0:
        raw.reshape(8, -1, 34)[2, 3, 2:6] = 128  # -128 as int8
    w = Weight(RawTensor("w", int(qtype), 8, 512, raw, raw.nbytes // 8))
    name = qtype.name.lower()
    k8 = int(qtype) in (Q.IQ4_XS,)
    x = rng.standard_normal((5, 512)).astype(np.float32)
    from sparserun.kernels import quant as K
    _, xd, x8, xb, _, _ = (K.acts_forms_k if k8 else K.acts_forms)(x)
    row, tokens = getattr(simd, f"dot_row_{name}_generic"), getattr(simd, f"dot_tokens_{name}_generic")

    def dots(raw, x8, xd, xb, out):
        nb = x8.shape[1] // 32
        for r in range(8):
            for t in range(x8.shape[0]):
                out[0, t, r] = row(raw, r * (raw.shape[0] // 8), nb, x8, t * x8.shape[1], xd, xb, t * nb)
            got = tokens(raw, r * (raw.shape[0] // 8), nb, x8, 0, x8.shape[1], xd, xb, 0, nb)
            for t in range(len(got)):
                out[1, t, r] = got[t]

    results = []
    for avx2 in (simd.ir.X86_AVX2, False):
        monkeypatch.setattr(simd.ir, "X86_AVX2", avx2)  # read at code generation (ir._route_dp)
        out = np.zeros((2, 5, 8), np.float32)
        f = njit(dots)
        f(w.raw, x8, xd, xb, out)
        assert ("pmadd.ub.sw" in f.inspect_llvm(f.signatures[0])) == avx2
        results.append(out)
    n_tok = simd.TOKENS
    np.testing.assert_array_equal(results[0], results[1])
    np.testing.assert_array_equal(results[0][1, :n_tok], results[0][0, :n_tok])  # tiles: one token at a time
    ref = (x8.astype(np.float64) * np.repeat(xd, 32, axis=1)) @ w.dequantize().astype(np.float64).T
    np.testing.assert_allclose(results[0][0], ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q5_K, Q.Q6_K, Q.Q3_K, Q.Q2_K, Q.IQ4_XS], ids=lambda t: t.name)
def test_repacked_k_quants_equal_the_gguf_layout(qtype):
    """The K-quants and IQ4_XS repacked at load (kernels/krepack.py: Q4_KR ... IQ4_XSR; the same bytes per row): the same dequantized
    values; the matmul on Q8_K-rounded activations equal to the GGUF-layout dot up to float rounding (both sum
    the same exact integers) and to numpy on those activations; on activations rounded per 32 values (the neuron
    packs' forms) equal to numpy on those; the generic route bit for bit the VNNI one; row subsets the rows'
    results; a neuron pack of repacked up rows the GGUF rows' pack."""
    from sparserun.kernels import quant as K
    from sparserun.kernels import sparse as S
    from sparserun.weights import REPACK

    rng = np.random.default_rng(31)
    rows, cols = 40, 1280
    w = weight(qtype, rows, cols, rng)
    r = w.repacked()
    assert r.qtype == REPACK[int(qtype)][0] and r.raw.nbytes == w.raw.nbytes and not np.array_equal(r.raw, w.raw)
    np.testing.assert_array_equal(r.dequantize(), w.dequantize())
    values = w.dequantize().astype(np.float64)
    name = {K.Q4_KR: "q4_kr", K.Q5_KR: "q5_kr", K.Q6_KR: "q6_kr", K.Q3_KR: "q3_kr", K.Q2_KR: "q2_kr",
            K.IQ4_XSR: "iq4_xsr"}[r.qtype]
    # the dense matmuls' dots (Q8_K forms, Q6_K's reading its half sums) and the neuron packs' (per-32 forms)
    dense = {route: getattr(K, f"matmul_{name}k_{route}") for route in ("generic", "vnni")}
    packs = {route: getattr(K, f"matmul_{name}_{route}") for route in ("generic", "vnni")}
    for T in (1, K.TOKENS_K + 3):
        x = rng.standard_normal((T, cols)).astype(np.float32)
        acts = Acts(x)
        got, gguf = r.matmul(acts), w.matmul(acts)
        np.testing.assert_allclose(got, gguf, rtol=1e-5, atol=1e-5 * np.abs(gguf).max())
        # Q8_K's rounding; then per 32 values, one token (the neuron packs' forms; their Q6_K dots find the first 16
        # values' sums themselves)
        runs = [(acts.forms_for(int(qtype)), dense)] + ([(acts.forms(), packs)] if T == 1 else [])
        for forms, kernels in runs:
            xq, xd, x8, xb, xt, xs = forms
            ref = (x8.astype(np.float64) * np.repeat(xd, 32, axis=1)) @ values.T
            out = np.empty((T, rows), np.float32)
            kernels["generic"]((r.raw,), r.row_bytes, np.array([0, rows]), *K.dot_forms(r.qtype, forms), out)
            np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max())
            if K.HAS_VNNI:
                want = np.empty_like(out)
                kernels["vnni"]((r.raw,), r.row_bytes, np.array([0, rows]), *K.dot_forms(r.qtype, forms), want)
                np.testing.assert_array_equal(out, want)
    ids = np.array([3, 0, 39, 17])
    acts = Acts(rng.standard_normal((1, cols)).astype(np.float32))
    np.testing.assert_array_equal(r.subset(ids).matmul(acts), r.matmul(acts)[:, ids])
    down = rng.standard_normal((rows, 32)).astype(np.float32)
    idx = np.array([1, 5, 6, 30], np.int64)
    outs = []
    for src in (w, r):
        units = np.concatenate([src.raw.reshape(rows, -1), down.view(np.uint8)], axis=1)
        out = np.empty(32, np.float32)
        S.pack_ffn(packed(units), units.shape[1], 0, src.row_bytes, src.qtype, src.qtype, K.HAS_VNNI, S.DOWN_F32,
                   32, idx, 4, np.ones(4, np.float32), S.COEF_TIMES_DOT, 1, acts.x, np.empty((2, 32), np.float32), out)
        outs.append(out)
    want = (acts.x.astype(np.float64) @ values[idx].T)[0] @ down[idx]
    np.testing.assert_allclose(outs[1], outs[0], rtol=1e-5, atol=1e-5 * np.abs(outs[0]).max())
    np.testing.assert_allclose(outs[1], want, rtol=0.02, atol=0.02 * np.abs(want).max())


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q5_0], ids=lambda t: t.name)
def test_generic_q4_0_q5_0_matmuls(qtype, monkeypatch):
    """Q4_0 and Q5_0 on CPUs without VNNI: the VNNI dots' code with vpdpbusd's sums in generic IR (pmaddubsw on AVX2).
    Against numpy's dot of the dequantized rows with the int8-rounded activations (exact integer block sums: float
    tolerance only); a batch in tiles bit-identical to one token at a time (40 + 24 rows in two buffers, 1056 columns,
    batches with leftover tokens); the sparse FFN's row dot (sparse._row_dot) the dense matmul's bit for bit; and the
    portable IR (a non-x86 build's) the same sums as the AVX2 form."""
    from numba import njit

    from sparserun.kernels import quant as K
    from sparserun.kernels import simd
    from sparserun.kernels import sparse as S
    from sparserun.weights import Matmuls

    rng = np.random.default_rng(17)
    cols = 1056
    ws = [weight(qtype, 40, cols, rng), weight(qtype, 24, cols, rng)]
    stack = Matmuls(ws)
    for T in (1, K.TOKENS, 2 * K.TOKENS + 3):
        x = rng.standard_normal((T, cols)).astype(np.float32)
        acts = Acts(x)
        xq, xd, x8, xb, xt, xs = acts.forms()
        xr = (x8.astype(np.float32).reshape(T, -1, 32) * xd[:, :, None]).reshape(T, cols)  # the rounded activations
        for w, got in zip(ws, stack(acts)):
            np.testing.assert_allclose(got, xr @ w.dequantize().T, rtol=1e-4, atol=1e-4 * np.abs(got).max())
            if T > 1:
                one = np.concatenate([Matmuls([w])(Acts(x[t:t + 1]))[0] for t in range(T)])
                np.testing.assert_array_equal(got, one)
            else:
                rows = np.array([S._row_dot(w.raw, r * w.row_bytes, int(qtype), False, x, xq, xd, x8, xb, xt, xs,
                                            np.empty(cols, np.float32)) for r in range(w.rows)])
                if not K.HAS_VNNI:
                    np.testing.assert_array_equal(got[0], rows)

    def row(w, x8, xd, xb):
        if qtype == Q.Q4_0:
            return simd.dot_row_q4_0_generic(w, 0, cols // 32, x8, 0, xd, xb, 0)
        return simd.dot_row_q5_0_generic(w, 0, cols // 32, x8, 0, xd, xb, 0)

    _, xd, x8, xb, _, _ = Acts(rng.standard_normal((1, cols)).astype(np.float32)).forms()
    host, avx2 = njit(row), simd.ir.X86_AVX2
    want = host(ws[0].raw, x8, xd, xb)
    for module in (simd.ir, simd.legacy):
        monkeypatch.setattr(module, "X86_AVX2", False)  # read at code generation
    portable = njit(row)
    assert portable(ws[0].raw, x8, xd, xb) == want != 0
    assert "pmadd.ub.sw" not in portable.inspect_llvm(portable.signatures[0])
    assert ("pmadd.ub.sw" in host.inspect_llvm(host.signatures[0])) == avx2
