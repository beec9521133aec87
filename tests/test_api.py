"""The Python API: shapes, cache reuse, batching, context limits, activations."""
import numpy as np
import pytest

import sparserun
from sparserun.generate import GenerationStats


def test_logits_shape_and_fresh_context(stories):
    m = sparserun.load(stories)
    ids = m.tokenize("Once upon a time")
    a = m.logits(ids)
    assert a.shape == (len(ids), m.n_vocab) and a.dtype == np.float32
    m.eval(ids + [100, 200])  # leave something else in the cache
    np.testing.assert_array_equal(m.logits(ids), a)


def test_incremental_eval_equals_batched(stories):
    """Decoding token by token through the KV cache gives the batched forward's logits."""
    m = sparserun.load(stories)
    ids = m.tokenize("Once upon a time, there was a little girl named Lily.")
    full = m.logits(ids)
    m.reset()
    rows = [m.eval(ids[: i + 1])[-1] for i in range(len(ids))]
    np.testing.assert_allclose(np.array(rows), full, atol=2e-4)


def test_small_batches_equal_one_batch(stories):
    ids = sparserun.load(stories).tokenize("The cat sat on the mat. It was happy and warm in the sun.")
    a = sparserun.load(stories, n_batch=256).logits(ids)
    b = sparserun.load(stories, n_batch=3).logits(ids)
    np.testing.assert_allclose(a, b, atol=2e-4)


def test_prefix_reuse_processes_only_new_tokens(stories):
    m = sparserun.load(stories)
    ids = m.tokenize("Once upon a time there was")
    m.eval(ids)
    stats = GenerationStats()
    list(m.generate(ids + m.tokenize(" a dog", add_bos=False), max_tokens=2, stats=stats, temperature=0.0))
    assert stats.prompt_tokens == len(m.tokenize(" a dog", add_bos=False))


def test_generation_stops_when_context_full(stories):
    m = sparserun.load(stories, n_ctx=24)
    stats = GenerationStats()
    text = "".join(m.generate("Once upon a time", max_tokens=100, stats=stats, temperature=0.0))
    assert stats.stop_reason == "context" and len(stats.tokens) == 24 and text
    with pytest.raises(sparserun.SparserunError, match="context full"):
        m.logits(list(range(1, 30)))


def test_seeded_sampling_is_reproducible(stories):
    m = sparserun.load(stories)
    a = "".join(m.generate("Once", max_tokens=20, temperature=1.0, seed=3))
    b = "".join(m.generate("Once", max_tokens=20, temperature=1.0, seed=3))
    assert a == b


@pytest.mark.parametrize("kv_type", ["f16", "f32"])
def test_relu_model_matches_numpy_reference(make_model, kv_type):
    """A ReLU (ReGLU) model, which llama.cpp cannot run as such, against a plain numpy forward pass (whose keys and
    values are rounded to float16 where the cache is f16)."""
    path = make_model("F32", shape="tiny", activation="relu")
    m = sparserun.load(path, kv_type=kv_type)
    assert m.args.activation == "relu" and m.args.gated
    ids = m.tokenize("The quick brown fox jumps over the lazy dog")
    np.testing.assert_allclose(m.logits(ids), numpy_forward(m, ids), atol=2e-3)


def numpy_forward(m, ids):
    """Independent float64 reference of the llama forward (normal-mode RoPE, GQA, ReGLU/SwiGLU)."""
    a = m.args
    W = lambda w: w.dequantize().astype(np.float64)
    x = W(m.tok_embd)[ids]
    T, hd = len(ids), a.head_dim
    norm = lambda v, g: v / np.sqrt((v * v).mean(-1, keepdims=True) + a.norm_eps) * g
    pos = np.arange(T)[:, None] * m.rope_inv_freq[None, :]
    cos, sin = np.cos(pos), np.sin(pos)

    def rope(v, nh):
        v = v.reshape(T, nh, hd).copy()
        x0, x1 = v[..., 0::2].copy(), v[..., 1::2].copy()
        v[..., 0::2] = x0 * cos[:, None] - x1 * sin[:, None]
        v[..., 1::2] = x0 * sin[:, None] + x1 * cos[:, None]
        return v

    act = {"silu": lambda g: g / (1 + np.exp(-g)), "relu": lambda g: np.maximum(g, 0)}[a.activation]
    for L in m.layers:
        h = norm(x, L.attn_norm)
        q, k, v = rope(h @ W(L.wq).T, a.n_head), rope(h @ W(L.wk).T, a.n_head_kv), (h @ W(L.wv).T).reshape(T, a.n_head_kv, hd)
        if m.kv_type == "f16":  # the cache's rounding (of float32 keys and values, as the engine computes them)
            k, v = (z.astype(np.float32).astype(np.float16).astype(np.float64) for z in (k, v))
        half = (lambda z: z.astype(np.float32).astype(np.float16).astype(np.float64)) if m.kv_type == "f16" else (
            lambda z: z)  # with an f16 cache, the scaled queries and the probabilities are rounded too (llama.cpp's)
        g = a.n_head // a.n_head_kv
        out = np.zeros((T, a.n_head, hd))
        for hh in range(a.n_head):
            s = half(q[:, hh] / np.sqrt(hd)) @ k[:, hh // g].T + np.triu(np.full((T, T), -np.inf), 1)
            p = np.exp(s - s.max(1, keepdims=True))
            out[:, hh] = half(p / p.sum(1, keepdims=True)) @ v[:, hh // g]
        x = x + out.reshape(T, -1) @ W(L.wo).T
        h = norm(x, L.ffn_norm)
        x = x + (act(h @ W(L.w_gate).T) * (h @ W(L.w_up).T)) @ W(L.w_down).T
    return norm(x, m.output_norm) @ W(m.output).T
