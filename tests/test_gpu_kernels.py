"""The hybrid's device formats and warp kernels (gpu_kernels.py) against numpy.

Run under numba's CUDA simulator (conftest.py) with its 2-lane warps, or on a GPU with NUMBA_ENABLE_CUDASIM=0
(benchmarks/hybrid_gpu.sh) with 32-lane ones: the same assertions hold for both.
"""
import numpy as np
import pytest

import sparserun
from sparserun import device_rows as R


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSERUN_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize("type", ["F32", "F16", "Q4_0", "Q8_0", "Q4_K_M", "Q5_0"])
def test_device_rows_hold_the_cpu_values(make_model, type):
    """Rows on the device equal the CPU's dequantization: exactly for F32, F16, Q4_0 and Q8_0 (the file's bytes,
    reordered), within 0.57 of a Q8_0 step for the types re-quantized to Q8_0; down columns are the CPU packs'."""
    from sparserun.ffn_pack import down_columns, down_kind

    m = sparserun.load(make_model(type, shape="small"), n_ctx=8)
    L = m.layers[1]
    ids = np.array([0, 5, 77, 100, 127])  # rows of every matrix below (wk: kv_dim = 128 rows)
    for w in (L.w_up, L.w_gate, L.wq, L.wk):
        h = R.rows(w, ids, m.gguf)
        got, ref = R.dequantize(h, w.cols), w.rows_f32(ids)
        if type in ("F32", "F16", "Q4_0", "Q8_0"):
            assert h.fmt == {"F32": R.F32, "F16": R.F16, "Q4_0": R.Q4, "Q8_0": R.Q8}[type]
            assert np.array_equal(got, ref), w.name
        else:  # re-quantized to Q8_0: half a step, plus the fp16 rounding of the scale times up to 127 steps
            assert h.fmt == R.Q8
            step = np.repeat(h.s.astype(np.float32), 32, axis=1)
            assert np.all(np.abs(got - ref) <= (0.5 + 127 * 2.0**-11) * step + 1e-7), w.name
        assert h.n_bytes == len(ids) * R.row_bytes(h.fmt, w.cols)
    d = R.down_columns(L.w_down, ids)
    cpu = down_columns(L.w_down, down_kind(L.w_down.qtype))[ids]  # the CPU packs' bytes for the same neurons
    n_q = d.q.nbytes // len(ids)
    assert np.array_equal(d.q.view(np.uint8).reshape(len(ids), -1), cpu[:, :n_q])
    if d.fmt != R.F32:
        assert np.array_equal(d.s.view(np.uint8).reshape(len(ids), -1), cpu[:, n_q:n_q + d.s.nbytes // len(ids)])


def _formats(rng, n, cols):
    x = rng.standard_normal((n, cols)).astype(np.float32)
    return [R.quantize(x, f) for f in (R.F32, R.F16, R.Q4, R.Q8)]


def test_row_kernel_equals_numpy_for_every_format_and_token_tile():
    from numba import cuda

    from sparserun import gpu_kernels as G

    rng = np.random.default_rng(0)
    n, cols = 9, 96  # 3 blocks of 32: the lanes' word strides wrap unevenly
    for h in _formats(rng, n, cols):
        w = R.dequantize(h, cols)
        for T in (1, 6):  # one token; a tile of 4 and a remainder of 2
            x = rng.standard_normal((T, cols)).astype(np.float32)
            out = cuda.device_array((T, n), np.float32)
            blocks, threads = G.row_grid(n, T)
            G.rows_matvec(h.fmt)[blocks, threads](cuda.to_device(h.q), cuda.to_device(h.s), cuda.to_device(x), out)
            np.testing.assert_allclose(out.copy_to_host(), x @ w.T, rtol=1e-4, atol=1e-4 * np.abs(x @ w.T).max())


def test_hot_ffn_kernels_equal_numpy():
    """Gate/up rows (Q4 and Q8) through hot_ffn_in with a threshold and a predictor's mask, then the down rows
    (neuron-major) through the chunked hot_ffn_out and sum_parts: the numpy FFN on the same values."""
    from numba import cuda

    from sparserun import gpu_kernels as G

    rng = np.random.default_rng(1)
    n_hot, dim, T = 11, 64, 5
    gate, up = R.quantize(rng.standard_normal((n_hot, dim)), R.Q4), R.quantize(rng.standard_normal((n_hot, dim)), R.Q8)
    down = R.quantize(rng.standard_normal((n_hot, dim)), R.Q4)
    x = rng.standard_normal((T, dim)).astype(np.float32)
    mask = (rng.random((T, n_hot)) < 0.6).astype(np.uint8)
    mask[:, 3] = 0  # a neuron predicted off for every token: its rows are not read
    g, u = x @ R.dequantize(gate, dim).T, x @ R.dequantize(up, dim).T
    act = g / (1 + np.exp(-g))  # silu
    thr = 0.2
    ref_h = np.where((np.abs(act) > thr) & (mask == 1), act * u, 0).astype(np.float32)
    d_h = cuda.device_array((T, n_hot), np.float32)
    blocks, threads = G.row_grid(n_hot, T)
    G.hot_ffn_in(gate.fmt, up.fmt)[blocks, threads](cuda.to_device(gate.q), cuda.to_device(gate.s),
                                                    cuda.to_device(up.q), cuda.to_device(up.s), True,
                                                    cuda.to_device(x), 0, np.float32(thr), cuda.to_device(mask),
                                                    True, d_h)
    h = d_h.copy_to_host()
    np.testing.assert_allclose(h, ref_h, rtol=1e-4, atol=1e-5)
    assert np.all(h[ref_h == 0] == 0)  # dropped neurons are exact zeros, so the down kernel skips them
    parts = cuda.device_array((G.CHUNKS, T, dim), np.float32)
    y = cuda.device_array((T, dim), np.float32)
    blocks, threads = G.out_grid(dim, T)
    G.hot_ffn_out(down.fmt)[blocks, threads](cuda.to_device(down.q), cuda.to_device(down.s), d_h, parts)
    blocks, threads = G.grid(dim, T)
    G.sum_parts[blocks, threads](parts, y)
    ref_y = h @ R.dequantize(down, dim)
    np.testing.assert_allclose(y.copy_to_host(), ref_y, rtol=1e-4, atol=1e-4 * np.abs(ref_y).max())


def test_attention_kernel_equals_numpy_softmax():
    """Warp-per-(token, head) attention with an online softmax: causal GQA over a cache that already holds pos0
    positions, against the plain two-pass softmax."""
    from numba import cuda

    from sparserun import gpu_kernels as G

    rng = np.random.default_rng(2)
    n_head, n_kv, hd, pos0, T = 4, 2, 40, 3, 3  # head_dim not a multiple of the warp: lanes past its end idle
    q = rng.standard_normal((T, n_head * hd)).astype(np.float32)
    kc = rng.standard_normal((8, n_kv * hd)).astype(np.float32)
    vc = rng.standard_normal((8, n_kv * hd)).astype(np.float32)
    out = cuda.device_array((T, n_head * hd), np.float32)
    blocks, threads = G.attention_grid(T, n_head)
    G.attention[blocks, threads](cuda.to_device(q), cuda.to_device(kc), cuda.to_device(vc),
                                 cuda.to_device(np.array([pos0])), n_head, n_kv, hd, out)
    ref = np.zeros_like(q)
    for t in range(T):
        for h in range(n_head):
            kv = h // (n_head // n_kv)
            k, v = kc[:pos0 + t + 1, kv * hd:(kv + 1) * hd], vc[:pos0 + t + 1, kv * hd:(kv + 1) * hd]
            s = k @ q[t, h * hd:(h + 1) * hd] / np.sqrt(hd)
            p = np.exp(s - s.max())
            ref[t, h * hd:(h + 1) * hd] = p @ v / p.sum()
    np.testing.assert_allclose(out.copy_to_host(), ref, rtol=1e-4, atol=1e-5)


def test_add_rmsnorm_equals_the_cpu_residual_add_and_norm():
    """The device's residual add and FFN norm (the step between a device attention block and the hot FFN chained to
    it) against kernels.ops: a dim that is not a multiple of the block, two tokens."""
    from numba import cuda

    from sparserun import gpu_kernels as G
    from sparserun.kernels import ops

    rng = np.random.default_rng(3)
    x, a = (rng.standard_normal((2, 70)).astype(np.float32) * 3 for _ in range(2))
    w = rng.standard_normal(70).astype(np.float32)
    ref = np.empty_like(x)
    ops.rmsnorm(x + a, w, 1e-5, ref)
    xn = cuda.device_array((2, 70), np.float32)
    G.add_rmsnorm[(2,), (G.THREADS,)](cuda.to_device(x), cuda.to_device(a), cuda.to_device(w), 1e-5, xn)
    np.testing.assert_allclose(xn.copy_to_host(), ref, rtol=1e-6, atol=1e-6)


def test_placement_counts_the_quantized_device_bytes(make_model):
    """A Q4_0 neuron costs its file bytes on the device (3 rows of dim/32 blocks of 18 bytes), so a budget places
    3.5x the neurons that float16 rows allowed."""
    from sparserun.placement import device_neuron_bytes, plan

    m = sparserun.load(make_model("Q4_0", shape="small", planted=0.5), n_ctx=8)
    dim = m.args.dim
    cost = device_neuron_bytes(m.layers[0], dim)
    assert cost == 3 * dim // 32 * 18
    budget = 500 * cost + cost // 2  # less than any attention block or the head: neurons only
    p = plan(m, budget)
    assert sum(len(g) for g in p.gpu_neurons) == 500 and p.used == 500 * cost
    assert 500 * cost * 3.5 <= 500 * 3 * dim * 2 * 1.001  # the same neurons took 3.5x the bytes as float16
