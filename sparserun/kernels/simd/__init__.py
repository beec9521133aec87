"""LLVM vector-IR intrinsics for the block dot products numba will not vectorize on its own, one module per family:

    ir          the frame: pointers, loads, fp16, horizontal sums, prefetch, the VNNI intrinsic frames
    legacy      Q4_0 / Q4_0R, Q4_1, Q5_0, Q5_1, Q8_0 and float32 row dots (generic and VNNI), token tiles for prompts
    kquants     Q2_K, Q3_K, Q4_K, Q5_K, Q6_K row dots and token tiles (VNNI and generic)
    krepacked   the same for K-quant and IQ4_XS rows repacked at load (Q4_KR ... Q2_KR, IQ4_XSR: kernels/krepack.py)
    iquants     IQ4_NL, IQ4_XS row dots and token tiles (VNNI and generic)
    axpy        the sparse FFN's down-column accumulations and fused gate/up dots
    attention   key-block scores and value-row sums

numba's loops over quantized blocks (a scale per 32 weights, nibbles to split) stay scalar; these emit the
vector code directly. A new weight type's dots go in its family's module and are named here.
"""
from .ir import (HAS_X86_VNNI, Q4_0R_GROUP, TOKENS, TOKENS_K, f32_bits, f32_from_bits, half_bits, load_bf16, load_f16, load_f32, prefetch,
    round_f16)  # noqa: F401
from .legacy import (TILE_ROWS, dot_row_f32, dot_row_q4_0_generic, dot_row_q4_0_vnni, dot_tile_q4_0_generic,
    dot_tile_q4_0_vnni, dot_row_q4_0r_vnni, dot_row_q4_0r_generic, dot_row_q5_0_generic, dot_tokens_q4_0_generic, dot_tokens_q5_0_generic,
    dot_row_q5_0_vnni, dot_row_q8_0, dot_row_q8_0_vnni, dot_row_q8_0_generic, dot_tokens_q8_0_generic, X86_AVX2, dot_tokens_q4_0r_vnni, dot_tokens_q4_0r_generic, dot_tokens_q5_0_vnni,
    dot_tokens_q8_0_vnni, dot_row_q4_1_vnni, dot_row_q5_1_vnni, dot_tokens_q4_1_vnni, dot_tokens_q5_1_vnni,
    dot_row_q4_1_generic, dot_row_q5_1_generic, dot_tokens_q4_1_generic, dot_tokens_q5_1_generic)  # noqa: F401
from .kquants import (dot_row_q4_k_generic, dot_row_q5_k_generic, dot_row_q6_k_generic, dot_tokens_q4_k_generic,
    dot_tokens_q5_k_generic, dot_tokens_q6_k_generic, dot_row_q4_k_vnni, dot_row_q5_k_vnni, dot_row_q6_k_vnni, dot_tokens_q4_k_vnni,
    dot_tokens_q5_k_vnni, dot_tokens_q6_k_vnni, dot_row_q2_k_vnni, dot_row_q3_k_vnni, dot_tokens_q2_k_vnni,
    dot_tokens_q3_k_vnni, dot_row_q2_k_generic, dot_row_q3_k_generic, dot_tokens_q2_k_generic,
    dot_tokens_q3_k_generic)  # noqa: F401
from .krepacked import (dot_row_q4_kr_vnni, dot_row_q4_kr_generic, dot_row_q5_kr_vnni, dot_row_q5_kr_generic,
    dot_row_q6_kr_vnni, dot_row_q6_kr_generic, dot_row_q4_krk_vnni, dot_tokens_q4_krk_vnni, dot_row_q4_krk_generic,
    dot_tokens_q4_krk_generic, dot_row_q5_krk_vnni, dot_tokens_q5_krk_vnni, dot_row_q5_krk_generic,
    dot_tokens_q5_krk_generic, dot_row_q6_krk_vnni, dot_tokens_q6_krk_vnni, dot_row_q6_krk_generic,
    dot_tokens_q6_krk_generic, dot_row_q3_kr_vnni, dot_row_q3_kr_generic, dot_row_q2_kr_vnni, dot_row_q2_kr_generic,
    dot_row_q3_krk_vnni, dot_tokens_q3_krk_vnni, dot_row_q3_krk_generic, dot_tokens_q3_krk_generic,
    dot_row_q2_krk_vnni, dot_tokens_q2_krk_vnni, dot_row_q2_krk_generic, dot_tokens_q2_krk_generic,
    dot_row_iq4_xsr_vnni, dot_row_iq4_xsr_generic, dot_row_iq4_xsrk_vnni, dot_tokens_iq4_xsrk_vnni,
    dot_row_iq4_xsrk_generic, dot_tokens_iq4_xsrk_generic)  # noqa: F401
from .iquants import (dot_row_iq4_nl_vnni, dot_tokens_iq4_nl_vnni, dot_row_iq4_nl_generic, dot_tokens_iq4_nl_generic,
    dot_row_iq4_xs_vnni, dot_tokens_iq4_xs_vnni, dot_row_iq4_xs_generic, dot_tokens_iq4_xs_generic,
    dot_row_iq4_nlr_vnni, dot_tokens_iq4_nlr_vnni, dot_row_iq4_nlr_generic, dot_tokens_iq4_nlr_generic)  # noqa: F401
from .axpy import (AXPY_Q4_COLUMNS, EXACT_PREFETCH, axpy_i8_generic, axpy_i8_vnni, axpy_q4_generic, axpy_q4_vnni, axpy_units_f32, coefs_q4_vnni, axpy_q4_exact_vnni, axpy_q4_exact_generic,
    dot_gate_up_q4_0r_vnni, dot_gate_up_q4_0r_generic)  # noqa: F401
from .attention import (ATTENTION_HEADS, KEY_BLOCK, key_block_dots, value_rows_sum)  # noqa: F401
