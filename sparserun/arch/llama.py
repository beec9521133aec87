"""The llama architecture (Llama 1/2/3, TinyLlama, Mistral-style): hyperparameters from GGUF metadata.

Activation: llama.cpp always computes SiLU for `llama`; this runtime honours the string key
`<arch>.ffn_activation` ("silu" default, "relu", "gelu") so ReLU-family sparse models can be run.
The FFN is gated (act(gate) * up) when blk.N.ffn_gate.weight exists, plain act(up) otherwise.
"""
from dataclasses import dataclass

import numpy as np

from ..errors import ModelFileError

NAMES = ("llama",)
ACTIVATIONS = ("silu", "relu", "gelu")
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

    @property
    def kv_dim(self):
        return self.n_head_kv * self.head_dim

    @classmethod
    def from_gguf(cls, f):
        a = f.architecture
        get = lambda k, d=None: f.get(f"{a}.{k}", d)
        req = lambda k: f.require(f"{a}.{k}")
        dim, n_head = int(req("embedding_length")), int(req("attention.head_count"))
        n_head_kv = int(get("attention.head_count_kv", n_head))
        head_dim = int(get("attention.key_length", dim // n_head))
        if n_head <= 0 or n_head_kv <= 0 or n_head % n_head_kv:
            raise ModelFileError(f.path, f"invalid head counts {n_head}/{n_head_kv}")
        act = str(get("ffn_activation", "silu")).lower()
        if act not in ACTIVATIONS:
            raise ModelFileError(f.path, f"unsupported {a}.ffn_activation {act!r} (supported: {', '.join(ACTIVATIONS)})")
        scale_type = str(get("rope.scaling.type", "none"))
        factor = float(get("rope.scaling.factor", 0.0) or 0.0)
        freq_scale = 1.0 / factor if scale_type == "linear" and factor > 0 else 1.0
        tok = f.tensor("token_embd.weight")
        return cls(
            arch=a, n_layer=int(req("block_count")), dim=dim, n_ff=int(req("feed_forward_length")),
            n_head=n_head, n_head_kv=n_head_kv, head_dim=head_dim,
            rope_dim=int(get("rope.dimension_count", head_dim)), rope_base=float(get("rope.freq_base", 10000.0)),
            rope_freq_scale=freq_scale, rope_type=ROPE_NORM,
            norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
            n_ctx_train=int(get("context_length", 2048)), n_vocab=tok.rows, activation=act,
            gated=f.has("blk.0.ffn_gate.weight"), tied_output=not f.has("output.weight"),
        )

    def layer_tensors(self, i):
        """name -> (rows, cols) of layer i's weights, in the GGUF naming of llama.cpp."""
        d, kv, ff, q = self.dim, self.kv_dim, self.n_ff, self.n_head * self.head_dim
        p = f"blk.{i}."
        names = {"attn_norm": (1, d), "attn_q": (q, d), "attn_k": (kv, d), "attn_v": (kv, d),
                 "attn_output": (d, q), "ffn_norm": (1, d), "ffn_up": (ff, d), "ffn_down": (d, ff)}
        if self.gated:
            names["ffn_gate"] = (ff, d)
        return {k: (p + k + ".weight", shape) for k, shape in names.items()}

    def rope_inv_freq(self, f):
        """Per-pair rotation frequency (rope_dim/2,) float64, with llama3-style rope_freqs factors if present."""
        inv = self.rope_freq_scale * self.rope_base ** (-np.arange(0, self.rope_dim, 2, dtype=np.float64) / self.rope_dim)
        if f.has("rope_freqs.weight"):
            ff = f.tensor("rope_freqs.weight", (1, self.rope_dim // 2))
            if ff.type_name != "F32":
                raise ModelFileError(f.path, f"tensor 'rope_freqs.weight' must be F32, not {ff.type_name}")
            inv = inv / ff.raw.view(np.float32).astype(np.float64)
        return inv
