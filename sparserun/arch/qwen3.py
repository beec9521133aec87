"""qwen3: qwen2's block without biases, plus a per-head RMSNorm of q and k before RoPE (attn_q_norm / attn_k_norm,
llama.cpp's llm_build_qwen3); head_dim from attention.key_length (128 on every size, not dim / n_head)."""
from .base import ROPE_NEOX, common_args

NAMES = ("qwen3",)


def model_args(f):
    m = common_args(f, rope_type=ROPE_NEOX, qk_norm=True)
    m.features.append("QK-norm")
    return m
