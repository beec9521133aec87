"""CPU/GPU hybrid: placement (optimality, budgets, file) and the GPU path under numba's CUDA simulator.

conftest.py sets NUMBA_ENABLE_CUDASIM=1 unless the environment says otherwise, so these run without a GPU
(and on a real one with NUMBA_ENABLE_CUDASIM=0). The simulator interprets every GPU thread in Python, so the
models here are tiny (dim 64, 2 layers, the 512-token stories260K vocabulary).
"""
import itertools
from pathlib import Path

import numpy as np
import pytest

import sparserun
from sparserun.errors import SparserunError
from sparserun.placement import device_bytes, greedy, load_placement, plan, save_placement
from sparserun.sparsity import parse_sparsity

IDS = [1, 45, 67, 89, 100, 200]
SIM_IDS = IDS[:4]  # hybrid_vs_cpu's tokens: a batch of 4, then 3 decode tokens over a growing cache (the simulator
# runs every GPU thread in Python: 6 tokens took 65 s with everything placed)


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSERUN_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tiny(make_model, stories):
    def mk(type="F32", **kw):
        return make_model(type, shape="tiny", vocab=stories, **kw)
    return mk


def hybrid_vs_cpu(path, frac, sparsity="dense", predictor=None):
    """(max |d logit| of a prompt batch, of token-by-token decode, logits' std) hybrid against CPU. Both keep a
    float32 KV cache, as attention placed on the GPU does (an f16 one rounds keys, values, queries and
    probabilities on the CPU only)."""
    cpu = sparserun.load(path, n_ctx=32, sparsity=sparsity, predictor=predictor, kv_type="f32")
    ref = cpu.logits(SIM_IDS)
    hyb = sparserun.load(path, n_ctx=32, sparsity=sparsity, predictor=predictor, device="cuda",
                         vram_budget=frac * device_bytes(cpu) / 2**30, kv_type="f32")
    assert hyb.placement is not None
    batch = hyb.logits(SIM_IDS)
    hyb.reset()
    dec = np.concatenate([hyb.eval(SIM_IDS[:i + 1]) for i in range(len(SIM_IDS))])  # the T=1 decode path
    return np.abs(batch - ref).max(), np.abs(dec - ref).max(), ref.std(), hyb


@pytest.mark.parametrize("frac", [0.0, 0.5, 1.0])
def test_hybrid_equals_cpu_relu(tiny, frac):
    d_batch, d_dec, std, hyb = hybrid_vs_cpu(tiny(planted=0.7), frac, "threshold:0")
    assert d_batch < 1e-4 * std and d_dec < 1e-4 * std, (d_batch, d_dec, std)
    n_gpu = sum(len(g) for g in hyb.placement.gpu_neurons)
    if frac == 0.0:
        assert hyb.placement.empty
    elif frac == 1.0:  # everything placed: all neurons, all attention blocks, the head
        assert n_gpu == 2 * 128 and hyb.placement.attn_gpu.all() and hyb.placement.output_gpu
        # each layer's hot FFN is queued behind its device attention block (GPUAttention.chain), never after the
        # CPU has the block's output: a next token with the unchained path disabled still equals the CPU's
        assert all(L.gpu_attn.chain is not None for L in hyb.layers)

        def unchained(li, x):
            raise AssertionError(f"layer {li}'s hot half was queued from the CPU")
        hyb.sparse.queue_hot = unchained
        ids = SIM_IDS + [IDS[4]]
        ref = sparserun.load(hyb.path, n_ctx=32, sparsity="threshold:0", kv_type="f32").eval(ids)
        assert np.abs(hyb.eval(ids) - ref).max() < 1e-4 * std
    else:  # a layer whose hot half is chained to its device attention block beside a cold half on the CPU
        assert 0 < n_gpu < 256
        assert any(L.gpu_attn is not None and L.gpu_attn.chain is not None and 0 < len(g) < 128
                   for L, g in zip(hyb.layers, hyb.placement.gpu_neurons))


def test_hybrid_equals_cpu_swiglu_threshold_and_dense(tiny):
    for spec in ("threshold:0.05", "dense"):
        d_batch, d_dec, std, _ = hybrid_vs_cpu(tiny(), 0.4, spec)
        assert d_batch < 1e-4 * std and d_dec < 1e-4 * std, (spec, d_batch, d_dec, std)


def test_hybrid_with_a_predicted_neuron_set(tiny):
    rng = np.random.default_rng(0)
    sets = [np.sort(rng.choice(128, 40, replace=False)) for _ in range(2)]

    def oracle(li, acts):  # a fixed predicted set per layer
        return [sets[li]] * acts.x.shape[0]

    d_batch, d_dec, std, hyb = hybrid_vs_cpu(tiny(planted=0.7), 0.3, predictor=oracle)
    assert d_batch < 1e-4 * std and d_dec < 1e-4 * std
    # the predicted set needs the CPU's FFN input: no layer's hot half is chained to its device attention
    assert all(L.gpu_attn is None or L.gpu_attn.chain is None for L in hyb.layers)


def test_hybrid_quantized_is_close(tiny):
    """Q8_0: the GPU holds float16 rows and float activations, the CPU int8 activations: llama.cpp-like error."""
    d_batch, d_dec, std, _ = hybrid_vs_cpu(tiny("Q8_0", planted=0.7), 0.5, "threshold:0")
    assert d_batch < 0.1 * std and d_dec < 0.1 * std, (d_batch, d_dec, std)


def test_topk_is_refused_on_the_gpu(tiny):
    with pytest.raises(SparserunError, match="topk"):
        sparserun.load(tiny(), n_ctx=8, sparsity="topk:0.5", device="cuda", vram_budget=0.0001)


def test_greedy_is_optimal_for_equal_costs_and_near_optimal_otherwise():
    rng = np.random.default_rng(0)
    for trial in range(30):
        n = 10
        v = rng.random(n)
        equal = trial % 2 == 0
        c = np.full(n, 3.0) if equal else rng.integers(1, 8, n).astype(float)
        budget = float(rng.integers(0, 30))
        got = v[greedy(v, c, budget)].sum()
        assert c[greedy(v, c, budget)].sum() <= budget
        best = max(v[list(s)].sum() for k in range(n + 1) for s in itertools.combinations(range(n), k)
                   if c[list(s)].sum() <= budget)
        if equal:
            assert got == pytest.approx(best)
        else:  # within one item of the optimum (the fractional bound)
            assert got >= best - v.max() - 1e-12


def test_plan_budgets_and_hotness(tiny):
    m = sparserun.load(tiny(planted=0.7), n_ctx=8)
    assert plan(m, 0).empty
    full = plan(m, 10**12)
    assert all(len(g) == 128 for g in full.gpu_neurons) and full.attn_gpu.all() and full.output_gpu
    assert full.used == device_bytes(m)
    freq = np.random.default_rng(1).random((2, 128)).astype(np.float32)
    p = plan(m, 40 * 3 * 64 * 4, freq)  # room for 40 neurons (float32 rows of 64)
    chosen = np.concatenate([freq[li][g] for li, g in enumerate(p.gpu_neurons)])
    assert len(chosen) == 40 and chosen.min() >= np.sort(freq.ravel())[-40]  # the 40 hottest over both layers


def test_a_sparse_plan_without_a_profile_measures_its_neurons(tiny, capsys):
    """No profile: the plan of a sparse policy ranks neurons by how often its keep rule kept them over the built-in
    text (one pass, said on stderr, cached), as a profile of that text would; the dense policy needs no pass."""
    from sparserun.hybrid import make_placement
    from sparserun.placement import FREQUENCY_TOKENS, FREQUENCY_WINDOW, builtin_frequencies
    from sparserun.profile import profile_model
    from sparserun.teal import builtin_text

    path = tiny(planted=0.7)
    m = sparserun.load(path, n_ctx=64, sparsity="threshold:0")
    budget = 0.2 * device_bytes(m)
    p = make_placement(m, budget / 2**30)
    assert "no profile; neuron hotness under --sparsity threshold:0" in capsys.readouterr().err
    ids = m.tokenize(builtin_text())[:FREQUENCY_TOKENS]
    assert m.n_ctx == m.kv.n_ctx == 64  # the pass's longer windows ran in a context of their own
    with m.context_of(FREQUENCY_WINDOW):  # ReLU: active = non-zero, threshold:0's rule
        freq = profile_model(m, ids, batch=FREQUENCY_WINDOW).frequency
    assert 0.05 < freq.mean() < 0.6 and freq.max() > 2 * freq.mean()  # planted: some neurons far hotter
    ref = plan(m, budget, freq)
    assert all(np.array_equal(a, b) for a, b in zip(p.gpu_neurons, ref.gpu_neurons)) and p.used == ref.used
    assert np.array_equal(p.attn_gpu, ref.attn_gpu) and p.output_gpu == ref.output_gpu
    hot = np.concatenate([freq[li][g] for li, g in enumerate(p.gpu_neurons)])
    cold = np.concatenate([np.delete(freq[li], g) for li, g in enumerate(p.gpu_neurons)])
    assert len(hot) and hot.min() >= cold.max()  # the hottest neurons, not whole layers
    assert np.array_equal(builtin_frequencies(m, m.policy), freq)  # from the cache now
    assert "no profile" not in capsys.readouterr().err
    dense = sparserun.load(path, n_ctx=64)
    assert builtin_frequencies(dense, dense.policy).min() == 1.0  # dense: every neuron computed, no pass
    assert capsys.readouterr().err == ""


def test_hot_head_rows_are_the_placed_head(tiny, stories):
    """Under --head hot the placement's head item is the hot rows (value their CPU bytes, cost their device bytes) and
    install moves them to the GPU: the hybrid's logits equal the CPU's hot head's, whose other rows stay estimated
    and exact on the CPU."""
    from sparserun.placement import device_matrix_bytes

    path = tiny(planted=0.7)
    cpu = sparserun.load(path, n_ctx=32, kv_type="f32", head="hot:128")
    ids = IDS[:3]  # the simulator runs every GPU thread in Python
    ref = cpu.logits(ids)
    full = plan(cpu, 10**12)
    whole = plan(sparserun.load(path, n_ctx=32), 10**12)
    assert full.output_gpu and full.used - whole.used == device_matrix_bytes(cpu.head.hot_w) - \
        device_matrix_bytes(cpu.output)
    hyb = sparserun.load(path, n_ctx=32, kv_type="f32", head="hot:128", device="cuda",
                         vram_budget=device_bytes(cpu) / 2**30)
    assert hyb.placement.output_gpu and type(hyb.head.hot_w).__name__ == "DeviceWeight"
    assert hyb.head.hot_w.rows == 128 and not isinstance(hyb.output, type(hyb.head.hot_w))
    got = hyb.logits(ids)
    assert np.abs(got - ref).max() < 1e-4 * ref.std()


def test_placement_file_round_trip_and_refusals(tiny, tmp_path):
    m = sparserun.load(tiny(planted=0.7), n_ctx=8)
    p = plan(m, 0.3 * device_bytes(m))
    f = tmp_path / "p.gguf"
    save_placement(p, f)
    back = load_placement(f, m)
    assert all(np.array_equal(a, b) for a, b in zip(p.gpu_neurons, back.gpu_neurons))
    assert (back.attn_gpu == p.attn_gpu).all() and back.output_gpu == p.output_gpu and back.used == p.used
    other = sparserun.load(tiny(planted=0.7, seed=5), n_ctx=8)
    with pytest.raises(SparserunError, match="another model"):
        load_placement(f, other)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(f.read_bytes()[:200])
    with pytest.raises(SparserunError, match="not a valid sparserun placement"):
        load_placement(bad, m)


def test_device_auto_falls_back_with_one_line(tiny, monkeypatch, capsys):
    import sys

    from sparserun import hybrid

    monkeypatch.setattr(hybrid, "cuda_status", lambda: (False, "no CUDA driver or GPU found"))
    m = sparserun.load(tiny(), n_ctx=8, device="auto", vram_budget=1.0, err=sys.stderr)
    assert m.placement is None
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["sparserun: no usable CUDA GPU (no CUDA driver or GPU found); running on the CPU"]
    with pytest.raises(SparserunError, match="--device cuda: no CUDA driver"):
        sparserun.load(tiny(), n_ctx=8, device="cuda")
    with pytest.raises(SparserunError, match="--vram-budget needs"):
        sparserun.load(tiny(), n_ctx=8, device="cpu", vram_budget=1.0)


def test_a_cuda_that_cannot_compile_is_refused_in_one_line(monkeypatch, capsys):
    """The probe compiles and runs a kernel: a numba-cuda that fails there (as one against a numpy it does not know
    did on a real machine) gives the one-line refusal or fallback, not a traceback at the first layer."""
    import sys

    from sparserun import gpu_kernels, hybrid

    class Broken:
        def __getitem__(self, launch_config):
            raise AttributeError("module 'numpy' has no attribute 'row_stack'")

    monkeypatch.setattr(gpu_kernels, "sum_parts", Broken())
    assert hybrid.cuda_status() == (False, "CUDA failed: AttributeError: module 'numpy' has no attribute 'row_stack'")
    with pytest.raises(SparserunError, match="^--device cuda: CUDA failed: AttributeError"):
        hybrid.resolve_device("cuda")
    assert hybrid.resolve_device("auto", 1.0, err=sys.stderr) == "cpu"
    assert capsys.readouterr().err.count("\n") == 1


def test_place_cli_and_generate_with_it(tiny, tmp_path):
    from typer.testing import CliRunner

    from sparserun.cli import app

    path = tiny(planted=0.7)
    r = CliRunner().invoke(app, ["profile", str(path), "--corpus", str(_corpus(tmp_path)), "--tokens", "64"])
    assert r.exit_code == 0, r.output
    out = Path(str(path) + ".placement.gguf")  # the default name, reused by later loads without a budget
    r = CliRunner().invoke(app, ["place", str(path), "--vram-budget", "0.0002"])
    try:
        assert r.exit_code == 0 and out.is_file(), r.output
        assert "neurons on GPU" in r.output
        placed = load_placement(out, sparserun.load(path, n_ctx=8))
        r = CliRunner().invoke(app, ["generate", str(path), "-p", "Once", "-n", "3", "--temp", "0", "--device", "cuda"])
        assert r.exit_code == 0, r.output
        assert f"hybrid CPU/GPU: {placed.summary()}" in r.output
    finally:
        out.unlink(missing_ok=True)


def test_place_without_a_profile_measures_under_its_policy(tiny, tmp_path):
    """`sparserun place` with no profile: refused (one line, from the CLI's error path) unless --sparsity names the
    policy whose keep rule the hotness is measured under; then the file holds the plan on-the-fly placement makes for
    that policy."""
    from typer.testing import CliRunner

    from sparserun.cli import app
    from sparserun.hybrid import make_placement

    import shutil

    path = tmp_path / "m.gguf"  # a copy: no profile beside it (test_place_cli's model has one)
    shutil.copy(tiny(planted=0.7), path)
    out = tmp_path / "p.gguf"
    r = CliRunner().invoke(app, ["place", str(path), "--vram-budget", "0.0002", "-o", str(out)])
    assert isinstance(r.exception, SparserunError) and "--sparsity" in str(r.exception) and not out.exists()
    r = CliRunner().invoke(app, ["place", str(path), "--vram-budget", "0.0002", "-o", str(out), "--sparsity",
                                 "threshold:0"])
    assert r.exit_code == 0 and out.is_file(), r.output
    m = sparserun.load(path, n_ctx=1)
    got = load_placement(out, m)
    want = make_placement(m, 0.0002, policy=parse_sparsity("threshold:0"))  # the cached frequencies
    assert sum(len(g) for g in got.gpu_neurons) > 0
    assert all(np.array_equal(a, b) for a, b in zip(got.gpu_neurons, want.gpu_neurons)) and got.used == want.used


def _corpus(tmp_path):
    f = tmp_path / "c.txt"
    f.write_text("Once upon a time there was a little cat. The cat liked to play in the sun. " * 6)
    return f


def test_bench_hybrid_mode_runs_and_reports(tiny):
    from sparserun.bench import run_bench

    res = run_bench(tiny(planted=0.7), ["dense", "sparse", "hybrid:0.5"], n_prompt=4, n_gen=2, reps=1, threads=2,
                    sparsity=["threshold:0"], fidelity_tokens=8)
    modes = {r["mode"] for r in res["results"]}
    assert modes == {"dense", "sparse threshold:0", "hybrid 0.5 threshold:0"}
    f = res["fidelity"]["hybrid 0.5 threshold:0"]
    assert f["top1_agreement"] == 1.0 and f["mean_kl"] < 1e-6  # the hybrid computes what the CPU computes
    with pytest.raises(SparserunError, match="hybrid:F"):
        run_bench(tiny(), ["hybrid:2"], n_prompt=4, n_gen=2)


def test_hybrid_takes_teal_on_its_cpu_attention(tiny, tmp_path):
    """teal:FILE+POLICY under the hybrid: with nothing placed the hybrid equals the CPU model under the same spec
    (the CPU's attention blocks run teal); with part placed, the CPU's blocks still hold the input sparsity."""
    from sparserun import teal

    path = tiny()
    m = sparserun.load(path, n_ctx=32)
    t, _, _ = teal.calibrate_teal(m, IDS * 4, 0.3, "uniform")
    teal.save_teal(tmp_path / "t.gguf", m, t)
    spec = f"teal:{tmp_path / 't.gguf'}+threshold:0.05"
    d_batch, d_dec, std, hyb = hybrid_vs_cpu(path, 0.0, spec)
    assert d_batch < 1e-4 * std and d_dec < 1e-4 * std, (d_batch, d_dec, std)
    assert hyb.inputs is not None and hyb.inputs.groups == frozenset(teal.ATTENTION)
    part = sparserun.load(path, n_ctx=32, sparsity=spec, device="cuda", vram_budget=0.3 * device_bytes(m) / 2**30)
    assert part.inputs is not None and np.all(np.isfinite(part.logits(IDS)))
