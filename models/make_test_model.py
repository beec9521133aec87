"""Write random-weight GGUFs of any supported architecture, shape and weight type, with a real vocabulary.

    python -m models.make_test_model out.gguf --dim 256 --ff 768 --layers 2 --type Q4_0
    python -m models.make_test_model out.gguf --preset tinyllama --type Q4_0
    python -m models.make_test_model out.gguf --arch gemma3 --dim 640 --head-dim 256 --window 16 --type Q4_K_M

Architectures: llama, qwen2 (q/k/v biases), qwen3 (QK-norm), gemma3 (QK-norm, post-norms, sliding window on 5 of
every 6 layers, tied head), gemma2 (post-norms, soft-caps, alternating window), phi3 (fused attn_qkv and gate|up,
partial rotary, LongRoPE factors and attention factor), bamboo (PowerInfer's: ReLU on gate and up), each with the
tensors and keys llama.cpp's loader requires of it. --powerinfer writes PowerInfer's PWRI layout (ffn_down_t, the
predictors fc1 / fc2, the magic "PWRI"): see powerinfer_predictors.

The vocabulary (every tokenizer.* key) is copied from a vocab-only GGUF, by default llama.cpp's
llama-spm vocab in tests/data/vocab/ (32000 tokens, the Llama 2 / TinyLlama tokenizer).
F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0 and Q5_1 are written directly with the gguf package (every 2-D weight in
that type, norms in F32: like llama.cpp's --pure). The K-quant and IQ mixes (Q2_K, Q3_K_M, Q4_K_M, Q5_K_M, Q6_K,
IQ4_NL, IQ4_XS) are made as llama.cpp makes them: write F32, then quantize with llama.cpp's own quantizer
(llama_model_quantize), which also picks its fallback types (Q5_0, Q8_0, IQ4_NL...) for rows whose length is not a
multiple of 256.
"""
import argparse
import ctypes
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter, quants

REPO = Path(__file__).resolve().parent.parent
DEFAULT_VOCAB = REPO / "tests" / "data" / "vocab" / "ggml-vocab-llama-spm.gguf"
# llama.cpp looks up Phi-3's own special tokens (<|end|>...) when it loads a phi3 file's vocabulary
ARCH_VOCAB = {"phi3": REPO / "tests" / "data" / "vocab" / "ggml-vocab-phi-3.gguf"}

DIRECT_TYPES = {name: GGMLQuantizationType[name] for name in ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0",
                                                               "Q5_1")}
# llama_ftype values of llama.cpp (include/llama.h)
LLAMA_FTYPES = {"Q2_K": 10, "Q3_K_M": 12, "Q4_K_M": 15, "Q5_K_M": 17, "Q6_K": 18, "IQ4_NL": 25, "IQ4_XS": 30}
FILE_TYPES = {"F32": 0, "F16": 1, "Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "BF16": 32}
ARCHS = ("llama", "qwen2", "qwen3", "gemma3", "gemma2", "phi3", "bamboo")
TYPES = list(DIRECT_TYPES) + list(LLAMA_FTYPES)


@dataclass
class Shape:
    dim: int = 64
    ff: int = 172
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    ctx: int = 2048
    rope_base: float = 10000.0
    tied: bool = False
    arch: str = "llama"
    head_dim: int = 0  # 0: dim // heads (gemma and qwen3 set it apart)
    window: int = 0  # sliding window of the gemma local layers (0: the architecture's default, 4096)
    rope_dim: int = 0  # rotated dimensions of a head (0: all; phi3 tests a partial rotary)
    rope_orig: int = 0  # phi3's rope.scaling.original_context_length (0: twice ctx, so the short factors apply)
    n_vocab: int = 0  # 0: the vocabulary GGUF's size; larger: padded with placeholder tokens (a big head's speed)

    @property
    def hd(self):
        return self.head_dim or self.dim // self.heads


PRESETS = {
    "tiny": Shape(dim=64, ff=128, layers=2, heads=4, kv_heads=2),
    "small": Shape(dim=256, ff=768, layers=2, heads=4, kv_heads=2),
    "tinyllama": Shape(dim=2048, ff=5632, layers=22, heads=32, kv_heads=4, rope_base=10000.0),
}


def copy_vocab(writer, vocab_path, pad_to=0):
    """Copy every tokenizer.* key of a GGUF into writer; returns the vocabulary size. pad_to: extend the token list
    (and its scores and types) with placeholder tokens "<pad_N>" up to that many."""
    r = GGUFReader(str(vocab_path))
    n_vocab = None
    n_src = len(r.fields["tokenizer.ggml.tokens"].contents()) if "tokenizer.ggml.tokens" in r.fields else 0
    extra = max(0, pad_to - n_src)
    for key, field in r.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        value = field.contents()
        if vtype == GGUFValueType.ARRAY and extra and key in PAD_WITH:
            value = list(value) + PAD_WITH[key](n_src, extra)
        if vtype == GGUFValueType.ARRAY:
            writer.add_key_value(key, value, vtype, sub_type=field.types[-1])
            if key == "tokenizer.ggml.tokens":
                n_vocab = len(value)
        else:
            writer.add_key_value(key, value, vtype)
    if n_vocab is None:
        raise SystemExit(f"{vocab_path}: no tokenizer.ggml.tokens, not a vocabulary GGUF")
    return n_vocab


PAD_WITH = {"tokenizer.ggml.tokens": lambda n, k: [f"<pad_{i}>" for i in range(n, n + k)],
            "tokenizer.ggml.scores": lambda n, k: [-1e4] * k,
            "tokenizer.ggml.token_type": lambda n, k: [4] * k}  # user-defined: matched whole, never merged


def planted_firing_rates(n, density, rng, skew=1.3):
    """Per-neuron firing probabilities following a power law in rank ((rank + 10) ** -skew), scaled so
    their mean is `density`, capped at 0.99, in random neuron order (hot neurons are not the first rows).
    skew 1.3 makes about a quarter of 5632 neurons cover 80% of activations (PowerInfer reports about that
    for real ReLU LLMs); `sparserun profile` measures what a model actually does."""
    ranks = np.arange(n, dtype=np.float64)
    lo, hi = 1e-6, 1e6
    for _ in range(200):  # bisection on the scale c so that mean(min(0.99, c * (r + 10) ** -skew)) = density
        c = (lo * hi) ** 0.5
        p = np.minimum(0.99, c * (ranks + 10.0) ** -skew)
        lo, hi = (c, hi) if p.mean() < density else (lo, c)
    return rng.permutation(p)


def plant_sparsity(w, shape, n_vocab, density, rng, alpha=1.0, rank=None):
    """Make a ReLU FFN fire for about `density` of neurons per token, with skewed per-neuron rates.

    Every token embedding gets a shared component alpha*sqrt(dim)*u (u a fixed unit vector), so after
    RMSNorm each token carries a near-constant projection on u. Each gate row gets a negative
    projection on u, a bias b_i = sigma * Phi^-1(1 - p_i) against the token-specific part of its input
    (std sigma), so neuron i fires with probability about p_i. Deeper layers drift from this; measure
    the result (`sparserun profile`, bench's kept fraction) rather than assume it.
    With `rank`, every layer's gate rows are drawn from a rank-`rank` basis, so which neurons fire is a
    low-rank function of the input, the structure activation predictors (Deja Vu) rely on in real LLMs; then the
    return value is each layer's factors (A (ff, rank+1), B (rank+1, dim)) with gate = A B (the basis and the
    planted direction u), else an empty list.
    """
    from statistics import NormalDist

    d = shape.dim
    u = rng.standard_normal(d)
    u /= np.linalg.norm(u)
    w["token_embd.weight"] += (alpha * np.sqrt(d) * u).astype(np.float32)
    inv = NormalDist().inv_cdf
    shrink = np.sqrt(1.0 + alpha * alpha)  # RMSNorm divides by this (|z|^2 ~ d plus the shared part)
    factors = []
    for i in range(shape.layers):
        g = w[f"blk.{i}.ffn_gate.weight"].astype(np.float64)
        if rank:
            basis = rng.standard_normal((rank, d)) / np.sqrt(d)
            coef = rng.standard_normal((shape.ff, rank))
            g = coef @ basis / np.sqrt(rank)
            basis = (basis - np.outer(basis @ u, u)) / np.sqrt(rank)  # g = coef @ basis after the line below
        g -= np.outer(g @ u, u)  # the random part ignores u; only the planted bias reads it
        sigma = np.linalg.norm(g, axis=1) / shrink  # std of g_i . z / shrink for z ~ N(0, I)
        p = planted_firing_rates(shape.ff, density, rng)
        bias = sigma * np.array([inv(1.0 - x) for x in p])  # fire when g_i . x > bias_i
        proj = alpha * np.sqrt(d) / shrink  # x . u after RMSNorm
        w[f"blk.{i}.ffn_gate.weight"] = (g - np.outer(bias / proj, u)).astype(np.float32)
        if rank:
            factors.append((np.hstack([coef, -(bias / proj)[:, None]]), np.vstack([basis, u])))
        # small output projections keep the shared component dominant through the layers
        w[f"blk.{i}.attn_output.weight"] *= np.float32(0.1)
        w[f"blk.{i}.ffn_down.weight"] *= np.float32(0.1)
    return factors


def powerinfer_predictors(w, shape, factors, rng, rank=64):
    """PowerInfer's per-layer predictors fc1 (r, dim), fc2 (n_ff, r), bias-free, on the FFN's residual input.

    With planted low-rank factors (gate = A B) they are exact: the gate reads rmsnorm(x) * w_norm, so its sign is the
    sign of A (B diag(w_norm)) x (RMSNorm only scales x), and with M = B diag(w_norm), fc1 = [M; -M] and
    fc2 = [A, -A] give fc2 relu(fc1 x) = A M x (relu(z) - relu(-z) = z): at threshold 0 the predicted set is the set
    of firing neurons, up to the weights' rounding. r = 2 (planted rank + 1), padded with zeros to a multiple of 32
    (quantized rows are whole 32-blocks). Without factors they are random (rank r), for the path's tests."""
    out = {}
    for i in range(shape.layers):
        if factors:
            a, b = factors[i]
            m = b * w[f"blk.{i}.ffn_norm.weight"][None, :]
            # balance each rank-1 term (|A_k| = |M_k|): a quantized fc2 row then keeps the small planted-bias
            # column, which decides firing, instead of rounding it away beside the basis columns
            c = np.sqrt(np.linalg.norm(m, axis=1) / np.linalg.norm(a, axis=0))
            a, m = a * c[None, :], m / c[:, None]
            fc1, fc2 = np.vstack([m, -m]), np.hstack([a, -a])
        else:
            fc1 = rng.standard_normal((rank, shape.dim)) / np.sqrt(shape.dim)
            fc2 = rng.standard_normal((shape.ff, rank)) / np.sqrt(rank)
        r = -(-fc1.shape[0] // 32) * 32
        out[f"blk.{i}.fc1.weight"] = np.pad(fc1, ((0, r - fc1.shape[0]), (0, 0))).astype(np.float32)
        out[f"blk.{i}.fc2.weight"] = np.pad(fc2, ((0, 0), (0, r - fc2.shape[1]))).astype(np.float32)
    return out


def random_weights(shape, n_vocab, rng):
    """name -> float32 array (rows, cols), scaled so activations and logits stay O(1) through the layers."""
    d, ff, hd = shape.dim, shape.ff, shape.hd
    q, kv = shape.heads * hd, shape.kv_heads * hd
    gemma, qk_norm = shape.arch.startswith("gemma"), shape.arch in ("qwen3", "gemma3")

    def lin(rows, cols, gain=1.0):
        return (rng.standard_normal((rows, cols), dtype=np.float32) * np.float32(gain / np.sqrt(cols)))

    def norm(n):
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    # gemma multiplies embeddings by sqrt(dim): smaller rows keep the residual stream O(1) there too
    w = {"token_embd.weight": rng.standard_normal((n_vocab, d), dtype=np.float32) / np.float32(np.sqrt(d) if gemma else 1),
         "output_norm.weight": norm(d)}
    if not (shape.tied or gemma):
        w["output.weight"] = lin(n_vocab, d, 2.0)
    for i in range(shape.layers):
        p = f"blk.{i}."
        w[p + "attn_norm.weight"] = norm(d)
        w[p + "attn_q.weight"] = lin(q, d, 2.0)
        w[p + "attn_k.weight"] = lin(kv, d, 2.0)
        w[p + "attn_v.weight"] = lin(kv, d)
        w[p + "attn_output.weight"] = lin(d, q)
        if shape.arch == "qwen2":
            for k, n in (("q", q), ("k", kv), ("v", kv)):
                w[p + f"attn_{k}.bias"] = (0.5 * rng.standard_normal(n)).astype(np.float32)
        if qk_norm:
            w[p + "attn_q_norm.weight"] = norm(hd)
            w[p + "attn_k_norm.weight"] = norm(hd)
        if gemma:
            w[p + "post_attention_norm.weight"] = norm(d)
            w[p + "post_ffw_norm.weight"] = norm(d)
        w[p + "ffn_norm.weight"] = norm(d)
        w[p + "ffn_gate.weight"] = lin(ff, d)
        w[p + "ffn_up.weight"] = lin(ff, d)
        w[p + "ffn_down.weight"] = lin(d, ff)
        if shape.arch == "phi3":  # fused as Phi-3's files hold them: q|k|v rows, gate|up rows
            w[p + "attn_qkv.weight"] = np.concatenate([w.pop(p + f"attn_{k}.weight") for k in "qkv"])
            w[p + "ffn_up.weight"] = np.concatenate([w.pop(p + "ffn_gate.weight"), w.pop(p + "ffn_up.weight")])
    if shape.arch == "phi3":  # LongRoPE: per-pair frequency divisors for short and long contexts
        for which in ("short", "long"):
            w[f"rope_factors_{which}.weight"] = rng.uniform(1.0, 4.0, (shape.rope_dim or hd) // 2).astype(np.float32)
    return w


def add_llama_hparams(writer, ctx, dim, layers, ff, heads, kv_heads, rope_base, eps, head_dim=None, rope_dim=None):
    """The <arch>.* hyperparameters every generated model writes (this generator and the storyteller's export)."""
    head_dim = head_dim or dim // heads
    writer.add_context_length(ctx)
    writer.add_embedding_length(dim)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ff)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_dimension_count(rope_dim or head_dim)
    writer.add_rope_freq_base(rope_base)
    writer.add_layer_norm_rms_eps(eps)
    if head_dim != dim // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)


def _write(path, shape, n_vocab_path, qtype, seed, activation, planted=None, planted_rank=None, powerinfer=False):
    rng = np.random.default_rng(seed)
    writer = GGUFWriter(str(path), shape.arch)
    writer.add_name(f"sparserun-test-{shape.arch}-{shape.dim}x{shape.layers}")
    n_vocab = copy_vocab(writer, n_vocab_path, shape.n_vocab)
    add_llama_hparams(writer, shape.ctx, shape.dim, shape.layers, shape.ff, shape.heads, shape.kv_heads,
                      shape.rope_base, 1e-6 if shape.arch.startswith("gemma") else 1e-5, shape.hd, shape.rope_dim)
    if shape.arch.startswith("gemma"):
        writer.add_sliding_window(shape.window or 4096)
    if shape.arch == "phi3":
        writer.add_rope_scaling_orig_ctx_len(shape.rope_orig or shape.ctx * 2)
        writer.add_rope_scaling_attn_factors(1.1902380714238083)  # sqrt(1 + log(32) / log(4096)), Phi-3's own
    if shape.arch == "gemma2":
        writer.add_float32("gemma2.attn_logit_softcapping", 50.0)
        writer.add_float32("gemma2.final_logit_softcapping", 30.0)
    writer.add_file_type(FILE_TYPES[qtype.name])
    if activation != "silu" and not powerinfer:  # PowerInfer's files say nothing: its sparse graph is ReLU
        writer.add_string(f"{shape.arch}.ffn_activation", activation)
    weights = random_weights(shape, n_vocab, rng)
    factors = plant_sparsity(weights, shape, n_vocab, 1.0 - planted, rng, rank=planted_rank) if planted is not None else []
    types = {}
    if powerinfer:  # PowerInfer's layout: down neuron-major, the predictors beside (sparserun/powerinfer.py)
        writer.add_float32("powerinfer.sparse_threshold", 0.0)
        for i in range(shape.layers):
            weights[f"blk.{i}.ffn_down_t.weight"] = np.ascontiguousarray(weights.pop(f"blk.{i}.ffn_down.weight").T)
        pred = powerinfer_predictors(weights, shape, factors, rng)
        weights.update(pred)
        # its quantizer's rule (llama_model_quantize_internal): Q4_0 predictors in a Q4_0 file, Q5_0 in other quantized ones
        if qtype not in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            types = dict.fromkeys(pred, GGMLQuantizationType.Q4_0 if qtype == GGMLQuantizationType.Q4_0
                                  else GGMLQuantizationType.Q5_0)
    for name, arr in weights.items():
        t = types.get(name, qtype)
        if arr.ndim == 1 or t == GGMLQuantizationType.F32 or name.endswith("norm.weight"):
            writer.add_tensor(name, arr)
        elif t == GGMLQuantizationType.F16:
            writer.add_tensor(name, arr.astype(np.float16))
        else:
            writer.add_tensor(name, quants.quantize(arr, t), raw_dtype=t)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    if powerinfer:
        from sparserun.powerinfer import mark_powerinfer

        mark_powerinfer(path)


def llama_quantize(src, dst, ftype_name, threads=2):
    """Quantize a GGUF with llama.cpp's own quantizer (the only maker of K-quant mixes)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = LLAMA_FTYPES[ftype_name]
    params.nthread = threads
    from sparserun.tokenizer import quiet_stderr

    with quiet_stderr():  # llama.cpp prints a line per tensor on stderr
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize failed ({rc}) for {dst}")


def make_model(path, type="F32", shape=None, seed=0, vocab=DEFAULT_VOCAB, activation="silu", planted=None,
               planted_rank=None, powerinfer=False, **shape_kw):
    """Write a random llama GGUF to path and return path. shape: a Shape or a preset name; shape_kw
    override its fields (dim=, ff=, layers=, heads=, kv_heads=, ctx=, tied=). planted: a target
    fraction of zero FFN activations (e.g. 0.9) for a ReLU model with planted, skewed sparsity. arch= (a shape
    field) picks the architecture (ARCHS). powerinfer: write PowerInfer's PWRI layout (ffn_down_t, predictors fc1/fc2
    exact for a planted-rank model, random otherwise; see powerinfer_predictors) in a directly written type."""
    if planted is not None:
        if not 0.0 < planted < 1.0:
            raise ValueError(f"planted sparsity must be in (0, 1), got {planted}")
        activation = "relu"
    base = PRESETS[shape] if isinstance(shape, str) else (shape or Shape())
    shape = Shape(**{**base.__dict__, **shape_kw})
    if type not in TYPES:
        raise ValueError(f"unknown type {type!r}; choose from {', '.join(TYPES)}")
    if shape.arch not in ARCHS:
        raise ValueError(f"unknown architecture {shape.arch!r}; choose from {', '.join(ARCHS)}")
    if planted is not None and shape.arch not in ("llama", "bamboo"):
        raise ValueError("planted sparsity is made for the llama architecture (its ReLU FFN)")
    if powerinfer and (shape.arch not in ("llama", "bamboo") or type not in DIRECT_TYPES):
        raise ValueError("PowerInfer files are written for llama and bamboo in a directly written type "
                         f"({', '.join(DIRECT_TYPES)}): llama.cpp's quantizer cannot read them")
    if Path(vocab) == DEFAULT_VOCAB:
        vocab = ARCH_VOCAB.get(shape.arch, vocab)
    if not Path(vocab).exists():
        raise FileNotFoundError(f"vocabulary GGUF {vocab} not found (pass vocab=...)")
    path = Path(path)
    if type in DIRECT_TYPES:
        _write(path, shape, vocab, DIRECT_TYPES[type], seed, activation, planted, planted_rank, powerinfer)
    else:
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            f32 = Path(tmp) / "f32.gguf"
            _write(f32, shape, vocab, GGMLQuantizationType.F32, seed, activation, planted, planted_rank)
            llama_quantize(f32, path, type)
    return path


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", help="output .gguf path")
    ap.add_argument("--type", default="F32", choices=TYPES)
    ap.add_argument("--preset", choices=list(PRESETS), help="a named shape (fields below override it)")
    ap.add_argument("--arch", choices=ARCHS)
    for field in ("dim", "ff", "layers", "heads", "kv_heads", "ctx", "head_dim", "window", "rope_dim", "n_vocab"):
        ap.add_argument(f"--{field.replace('_', '-')}", type=int, dest=field)
    ap.add_argument("--tied", action="store_true", help="no output.weight: the head reuses token_embd")
    ap.add_argument("--activation", default="silu", choices=["silu", "relu", "gelu"])
    ap.add_argument("--planted-sparsity", type=float, dest="planted", metavar="FRAC",
                    help="ReLU model whose FFN activations are about FRAC zeros, with power-law neuron hotness")
    ap.add_argument("--planted-rank", type=int, dest="planted_rank", metavar="R",
                    help="with --planted-sparsity: gate rows from a rank-R basis (low-rank predictable activations)")
    ap.add_argument("--powerinfer", action="store_true",
                    help="PowerInfer's PWRI file: ffn_down_t and predictors fc1/fc2 (exact with --planted-rank)")
    ap.add_argument("--vocab", default=str(DEFAULT_VOCAB), help="GGUF to copy the tokenizer from")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    kw = {k: getattr(a, k) for k in ("dim", "ff", "layers", "heads", "kv_heads", "ctx", "head_dim", "window", "rope_dim",
                                     "n_vocab", "arch")
          if getattr(a, k) is not None}
    if a.tied:
        kw["tied"] = True
    p = make_model(a.out, a.type, a.preset, a.seed, a.vocab, a.activation, a.planted, a.planted_rank, a.powerinfer, **kw)
    print(f"wrote {p} ({p.stat().st_size / 1e6:.1f} MB)")


if __name__ == "__main__":
    sys.exit(main())
