"""What every architecture shares: ModelArgs, the hyperparameters and block switches one shared block reads
(model.Model._block), built from a GGUF's metadata by an architecture module registered by name (see __init__).

An architecture differs from llama in a few switches, not in a forward of its own: norms after attention and the
FFN (gemma2/3), per-head RMSNorm on q and k (qwen3, gemma3), q/k/v biases (qwen2, read from the file when present),
an embedding scale, an activation, the RoPE layout and base per layer, a sliding window per layer, soft-caps.
"""
from dataclasses import dataclass, field

import numpy as np

from ..errors import ModelFileError

ACTIVATIONS = ("silu", "relu", "gelu")  # what a file's <arch>.ffn_activation may name
# relu_sym: relu(gate) * relu(up), PowerInfer's LLM_FFN_SYM (bamboo); set by an architecture, never read from a file
ROPE_NORM, ROPE_NEOX = 0, 2  # llama.cpp's rope types: adjacent pairs / split halves


@dataclass
class ModelArgs:
    arch: str
    n_layer: int
    dim: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    rope_dim: int
    rope_base: float
    rope_freq_scale: float
    rope_type: int
    norm_eps: float
    n_ctx_train: int
    n_vocab: int
    activation: str
    gated: bool
    tied_output: bool
    # block switches (llama's values by default)
    emb_scale: float = 1.0  # token embeddings multiplied by this (gemma: sqrt(dim))
    qk_norm: bool = False  # per-head RMSNorm of q and k before RoPE (attn_q_norm / attn_k_norm)
    post_norms: bool = False  # RMSNorm of attention's and the FFN's outputs before each residual add
    attn_scale: float = 0.0  # scores scale; 0: 1/sqrt(head_dim)
    attn_softcap: float = 0.0  # scores -> c tanh(scores / c) when c > 0 (gemma2)
    final_softcap: float = 0.0  # logits -> c tanh(logits / c) when c > 0 (gemma2)
    swa_window: int = 0  # sliding window of the layers in swa_layers (keys at most swa_window - 1 positions back)
    swa_layers: tuple = ()  # one bool per layer
    rope_base_swa: float = 0.0  # the sliding-window layers' RoPE base (0: rope_base, unscaled)
    rope_attn_factor: float = 1.0  # cos and sin scaled by this (rope.scaling.attn_factor: LongRoPE's, YaRN's)
    n_ctx_orig: int = 0  # rope.scaling.original_context_length: past it, rope_factors_long replace the short ones
    fused: dict = field(default_factory=dict)  # a fused tensor's key -> the keys of its row blocks, in order (phi3)
    down_t: bool = False  # ffn_down stored transposed as ffn_down_t (n_ff, dim), neuron-major (PowerInfer's files)
    features: list = field(default_factory=list)  # what `sparserun info` names

    @property
    def kv_dim(self):
        return self.n_head_kv * self.head_dim

    def window(self, i):
        """Sliding window of layer i (0: full causal attention)."""
        return self.swa_window if self.swa_layers and self.swa_layers[i] else 0

    def layer_shapes(self):
        """(required, optional): key -> (rows, cols) of a layer's weights, each fused tensor's parts apart."""
        d, kv, ff, q, hd = self.dim, self.kv_dim, self.n_ff, self.n_head * self.head_dim, self.head_dim
        req = {"attn_norm": (1, d), "attn_q": (q, d), "attn_k": (kv, d), "attn_v": (kv, d), "attn_output": (d, q),
               "ffn_norm": (1, d), "ffn_up": (ff, d), "ffn_down": (d, ff)}
        if self.gated:
            req["ffn_gate"] = (ff, d)
        if self.down_t:
            del req["ffn_down"]
            req["ffn_down_t"] = (ff, d)
        if self.qk_norm:
            req.update(attn_q_norm=(1, hd), attn_k_norm=(1, hd))
        if self.post_norms:
            req.update(post_attention_norm=(1, d), post_ffw_norm=(1, d))
        opt = {"attn_q.bias": (1, q), "attn_k.bias": (1, kv), "attn_v.bias": (1, kv)}  # qwen2's; any arch may carry them
        return req, opt

    def layer_tensors(self, i):
        """name -> (GGUF tensor name, (rows, cols), required) of layer i's weights, in llama.cpp's naming."""
        p = f"blk.{i}."
        req, opt = self.layer_shapes()
        for whole, parts in self.fused.items():  # one tensor holding its parts' rows one after another
            req[whole] = (sum(req.pop(k)[0] for k in parts), self.dim)
        out = {k: (p + k + ".weight", shape, True) for k, shape in req.items()}
        out.update({k: (p + k, shape, False) for k, shape in opt.items()})
        return out

    def rope_inv_freq(self, f, i=None, n_ctx=0):
        """Per-pair rotation frequency (rope_dim/2,) float64 of layer i for a context of n_ctx, divided by the file's
        frequency factors where it has them (llama.cpp's get_rope_factors: llama3's rope_freqs, else LongRoPE's
        rope_factors_long past n_ctx_orig and rope_factors_short within it). Sliding-window layers may rotate with a
        base of their own (rope_base_swa, unscaled, no factors: llama.cpp's rope_freq_base_train_swa)."""
        swa = i is not None and self.window(i) and self.rope_base_swa
        base, scale = (self.rope_base_swa, 1.0) if swa else (self.rope_base, self.rope_freq_scale)
        inv = scale * base ** (-np.arange(0, self.rope_dim, 2, dtype=np.float64) / self.rope_dim)
        names = ["rope_freqs.weight", "rope_factors_long.weight" if n_ctx > self.n_ctx_orig > 0
                 else "rope_factors_short.weight"]
        name = next((n for n in names if f.has(n)), None)
        if name is not None and not swa:
            ff = f.tensor(name, (1, self.rope_dim // 2))
            if ff.type_name != "F32":
                raise ModelFileError(f.path, f"tensor {name!r} must be F32, not {ff.type_name}")
            inv = inv / ff.raw.view(np.float32).astype(np.float64)
        return inv


def common_args(f, **overrides):
    """ModelArgs from the `<arch>.*` keys every llama-like file carries; overrides set the architecture's switches."""
    a = f.architecture
    get = lambda k, d=None: f.get(f"{a}.{k}", d)
    req = lambda k: f.require(f"{a}.{k}")
    tok = f.tensor("token_embd.weight")  # first: an unsupported type is named before any shape problem
    args = _read_args(f, a, get, req, tok)
    args.update(overrides)
    m = ModelArgs(**args)
    if m.rope_dim <= 0 or m.rope_dim > m.head_dim or m.rope_dim % 2:
        raise ModelFileError(f.path, f"invalid rope.dimension_count {m.rope_dim} for head_dim {m.head_dim}")
    if f.has("blk.0.attn_q.bias"):
        m.features.append("q/k/v biases")
    return m


def _scalar(v):
    """A per-layer array key (some files store head counts per layer) as one value when all layers agree."""
    if isinstance(v, np.ndarray):
        if v.size == 0 or (v != v.flat[0]).any():
            raise ValueError("per-layer values differ")
        return v.flat[0]
    return v


def _read_args(f, a, get, req, tok):
    """common_args' reading of the keys (a value of the wrong kind raises TypeError or ValueError: arch.model_args
    turns that into one line)."""
    dim, n_head = int(req("embedding_length")), int(_scalar(req("attention.head_count")))
    n_head_kv = int(_scalar(get("attention.head_count_kv", n_head)))
    head_dim = int(get("attention.key_length", dim // n_head if n_head > 0 else 0))
    n_layer, n_ff = int(req("block_count")), int(_scalar(req("feed_forward_length")))
    if n_head <= 0 or n_head_kv <= 0 or n_head % n_head_kv or head_dim <= 0 or n_layer <= 0 or n_ff <= 0:
        raise ModelFileError(f.path, f"invalid shape: {n_layer} layers, heads {n_head}/{n_head_kv}, head_dim {head_dim}, "
                                     f"n_ff {n_ff}")
    act = str(get("ffn_activation", "silu")).lower()
    if act not in ACTIVATIONS:
        raise ModelFileError(f.path, f"unsupported {a}.ffn_activation {act!r} (supported: {', '.join(ACTIVATIONS)})")
    scale_type = str(get("rope.scaling.type", "none"))
    factor = float(get("rope.scaling.factor", 0.0) or 0.0)
    freq_scale = 1.0 / factor if scale_type == "linear" and factor > 0 else 1.0
    args = dict(
        arch=a, n_layer=n_layer, dim=dim, n_ff=n_ff, n_head=n_head, n_head_kv=n_head_kv, head_dim=head_dim,
        rope_dim=int(get("rope.dimension_count", head_dim)), rope_base=float(get("rope.freq_base", 10000.0)),
        rope_freq_scale=freq_scale, rope_type=ROPE_NORM,
        rope_attn_factor=float(get("rope.scaling.attn_factor", 1.0) or 1.0),
        n_ctx_orig=int(get("rope.scaling.original_context_length", 0) or 0),
        norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        n_ctx_train=int(get("context_length", 2048)), n_vocab=tok.rows, activation=act,
        gated=f.has("blk.0.ffn_gate.weight"), tied_output=not f.has("output.weight"))
    return args
