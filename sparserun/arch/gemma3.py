"""gemma3 (text) and gemma2: token embeddings x sqrt(dim), GELU (tanh) gated FFN, RMSNorm after attention and after
the FFN as well as before (post_attention_norm, post_ffw_norm), NEOX RoPE, tied output, interleaved sliding-window
attention. The file's norm gains already include Gemma's +1 (llama.cpp's converter adds it).

gemma3 (llama.cpp's llama_load_hparams_gemma3 and llm_build_gemma3): QK-norm; 5 sliding-window layers then one
global (set_swa_pattern(6): layer i is local when i % 6 < 5), window `gemma3.attention.sliding_window`; local
layers rotate with base 10000 unscaled (rope_freq_base_train_swa), global ones with rope.freq_base and the file's
scaling; attention scale 1/sqrt(head_dim), except the 27B (62 layers): 1/sqrt(dim / n_head); an optional final
logit soft-cap.
gemma2 (llm_build_gemma2_iswa): no QK-norm; local and global layers alternate (set_swa_pattern(2)), one RoPE base;
attention-logit and final-logit soft-caps; the same scale rule (27B: 46 layers).
"""
import math

from ..errors import ModelFileError
from .base import ROPE_NEOX, common_args

NAMES = ("gemma3", "gemma2")


def model_args(f):
    a = f.architecture
    gemma3 = a == "gemma3"
    m = common_args(f, rope_type=ROPE_NEOX, activation="gelu", post_norms=True, qk_norm=gemma3, tied_output=True)
    if not m.gated:
        raise ModelFileError(f.path, f"{a} without ffn_gate tensors")
    m.emb_scale = math.sqrt(m.dim)
    big = m.n_layer == (62 if gemma3 else 46)  # the 27B scales by dim / n_head
    m.attn_scale = 1.0 / math.sqrt(m.dim / m.n_head if big else m.head_dim)
    m.final_softcap = float(f.get(f"{a}.final_logit_softcapping", 0.0) or 0.0)
    if not gemma3:
        m.attn_softcap = float(f.get(f"{a}.attn_logit_softcapping", 0.0) or 0.0)
    window = int(f.get(f"{a}.attention.sliding_window", 0) or 0)
    if window > 0:
        period = 6 if gemma3 else 2
        m.swa_window, m.swa_layers = window, tuple(i % period < period - 1 for i in range(m.n_layer))
        if gemma3:
            m.rope_base_swa = 10000.0
        m.features.append(f"sliding window {window} on {sum(m.swa_layers)} of {m.n_layer} layers "
                          f"({period - 1} local : 1 global)")
    if m.qk_norm:
        m.features.append("QK-norm")
    m.features.append("post-norms")
    for name, cap in (("attention", m.attn_softcap), ("final", m.final_softcap)):
        if cap:
            m.features.append(f"{name} soft-cap {cap:g}")
    return m
