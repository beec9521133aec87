"""phi3 (Phi-3, Phi-3.5, Phi-4-mini): llama's block with q, k and v fused in one matrix (attn_qkv: q rows, then k,
then v) and gate and up fused in ffn_up (gate rows first: llama.cpp's LLM_FFN_SWIGLU with LLM_FFN_SEQ splits the
product in halves), NEOX RoPE over rope.dimension_count dimensions (partial on Phi-4-mini), and LongRoPE: the
frequencies divided by rope_factors_long where the context is longer than rope.scaling.original_context_length,
else by rope_factors_short, and cos / sin scaled by rope.scaling.attn_factor (both as llama.cpp's
get_rope_factors and rope_yarn do; base.ModelArgs.rope_inv_freq). llama.cpp runs phi3 without its sliding window
(llama_model_phi3::load_arch_hparams: "Phi SWA is currently disabled"), and so does this engine."""
from .base import ROPE_NEOX, common_args

NAMES = ("phi3",)


def model_args(f):
    fused = {}
    if f.has("blk.0.attn_qkv.weight"):
        fused["attn_qkv"] = ("attn_q", "attn_k", "attn_v")
    if not f.has("blk.0.ffn_gate.weight"):
        fused["ffn_up"] = ("ffn_gate", "ffn_up")
    m = common_args(f, rope_type=ROPE_NEOX, gated=True, fused=fused)
    m.features += [f"fused {k}" for k in fused]
    if f.has("rope_factors_long.weight"):
        m.features.append("LongRoPE factors")
    return m
