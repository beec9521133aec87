"""Dots of the non-linear 4-bit types: IQ4_NL (32-value blocks: fp16 d, 16 nibble bytes in Q4_0's order; value =
d levels[q]; llama.cpp dots it against Q8_0 activations) and IQ4_XS (256-value super-blocks: fp16 d, 2 bytes of
high and 4 of low scale bits, 128 nibble bytes; sub-block j's value = d (ls_j - 32) levels[q]; against Q8_K).

Each nibble indexes ggml's 16 levels (ggml-common.h kvalues_iq4nl); the levels + 128 are the unsigned bytes
vpdpbusd multiplies, and each lane starts from 16 xb = -128 x its activations' sum, which takes the offset back out:
exact int32 sums, as for Q8_0 (on the generic route of AVX2 CPUs the levels themselves, with no offset:
ir._dpbssd_avx2). The lookup is one vpshufb on x86 (the VNNI route and AVX2's generic one) and a chain of 16 selects
in portable IR (no portable IR instruction indexes a vector by a vector).
"""
from llvmlite import ir
from numba.core import cgutils

from .ir import _i32, _i8, _routes, _signed, _splat, _vload
from .kquants import _kquant_tokens
from .legacy import _q4_0r_dots, offset128_token_dots

LEVELS = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
_SHIFTED = [v + 128 - 256 if v + 128 > 127 else v + 128 for v in LEVELS]  # levels + 128 as i8 bit patterns


def _levels(builder, idx, dp):
    """<32 x i8>: levels[idx] + 128 (unsigned) of nibbles idx (<32 x i8>, 0..15)."""
    v32 = ir.VectorType(_i8, 32)
    if dp.name.startswith("llvm.x86") or _signed(dp):  # vpshufb looks each byte up in its 128-bit lane's table
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v32, [v32, v32]), "llvm.x86.avx2.pshuf.b")
        return builder.call(fn, [ir.Constant(v32, _SHIFTED * 2), idx])
    out = ir.Constant(v32, [_SHIFTED[0]] * 32)
    for i in range(1, 16):
        out = builder.select(builder.icmp_unsigned("==", idx, _splat(32, i)), _splat(32, _SHIFTED[i]), out)
    return out


def _level_lanes(builder, nib, dp):
    """<8 x i32>: the levels of nibbles nib (32 bytes, 0..15) as dp multiplies them: + 128 (vpdpbusd's unsigned
    bytes, the offset taken out by the caller's seed), or themselves on AVX2's signed dot (ir._dpbssd_avx2)."""
    v = _levels(builder, builder.bitcast(nib, ir.VectorType(_i8, 32)), dp)
    return builder.bitcast(builder.xor(v, _splat(32, -128)) if _signed(dp) else v, ir.VectorType(_i32, 8))


def _nibbles(builder, p):
    """The 32 nibbles of 16 bytes at p, in value order (low nibbles first, then high)."""
    qs = _vload(builder, p, 16)
    return builder.shuffle_vector(builder.and_(qs, _splat(16, 15)), builder.lshr(qs, _splat(16, 4)),
                                  ir.Constant(ir.VectorType(_i32, 32), list(range(32))))


_iq4_nl_token_dots = offset128_token_dots(18, lambda builder, bp, dp: _levels(
    builder, _nibbles(builder, builder.gep(bp, [ir.Constant(ir.IntType(64), 2)])), dp))


def _iq4_xs_super_block(builder, wp, dp):
    i64, f32 = ir.IntType(64), ir.FloatType()
    c = lambda v: ir.Constant(i64, v)  # noqa: E731
    k32 = lambda v: ir.Constant(_i32, v)  # noqa: E731

    def emit(s, block):
        p = builder.gep(wp, [builder.mul(s, c(136))])
        d = builder.fpext(builder.load(builder.bitcast(p, ir.HalfType().as_pointer()), align=1), f32)
        sh = builder.zext(builder.load(builder.bitcast(builder.gep(p, [c(2)]), ir.IntType(16).as_pointer()), align=1),
                          _i32)
        init = lambda xbv: builder.shl(xbv, _splat(8, 4, _i32))  # noqa: E731
        for j in range(8):
            sl = builder.zext(builder.load(builder.gep(p, [c(4 + j // 2)])), _i32)
            ls = builder.or_(builder.and_(builder.lshr(sl, k32(4 * (j % 2))), k32(15)),
                             builder.shl(builder.and_(builder.lshr(sh, k32(2 * j)), k32(3)), k32(4)))
            scale = builder.fmul(d, builder.sitofp(builder.sub(ls, k32(32)), f32))
            block(j, _levels(builder, _nibbles(builder, builder.gep(p, [c(8 + 16 * j)])), dp), init, scale, None)

    return emit


dot_row_iq4_nl_vnni, dot_tokens_iq4_nl_vnni, dot_row_iq4_nl_generic, dot_tokens_iq4_nl_generic = _routes(
    _iq4_nl_token_dots, "IQ4_NL", signed=True)
dot_row_iq4_xs_vnni, dot_tokens_iq4_xs_vnni, dot_row_iq4_xs_generic, dot_tokens_iq4_xs_generic = _routes(
    _kquant_tokens(_iq4_xs_super_block), "IQ4_XS", signed=True)
# IQ4_NL repacked at load as Q4_0 is (IQ4_NLR: quant.repack_q4_0, the same block geometry): repacked Q4_0's group
# frame with each nibble looked up
dot_row_iq4_nlr_vnni, dot_tokens_iq4_nlr_vnni, dot_row_iq4_nlr_generic, dot_tokens_iq4_nlr_generic = _routes(
    lambda builder, wp, nb, xps, xdps, xsps, dp: _q4_0r_dots(builder, [wp], nb, xps, xdps, xsps, dp,
                                                            levels=_level_lanes)[0], "IQ4_NLR", per_block=1, signed=True)
