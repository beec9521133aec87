"""The sparse FFN's intrinsics: down columns of kept neurons accumulated into the output (axpy over neuron units,
Q4 / int8 / float32 and the Q4_0 VNNI form with its coefficients), and a neuron's gate and up rows dotted in
one pass (dot_gate_up_q4_0r_vnni, the interleaved rows of ffn_pack).
"""
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic
from .ir import (Q4_0R_GROUP, X86_AVX2, _dpbusd_generic, _i32, _i8, _pmaddubsw, _pmaddwd_ones,
    _prefetch_line, _ptr, _splat, _splat_f, _vload, _vnni_dot_setup, _vnni_or_trap)
from .legacy import (_q4_0r_dots)

@intrinsic
def axpy_units_f32(typingctx, acc, u, offs, h, cnt, nb):
    """acc[:] += sum_{g < cnt} h[g] * column(offs[g]) over nb blocks of 32 values: a group of kept neurons' float32
    down columns at byte offsets offs[g] of u, added to acc (32 nb,) float32. Each 32-value slice of acc is loaded and
    stored once per group rather than once per neuron. (Quantized columns take the integer axpys.)"""
    sig = types.void(acc, u, offs, h, cnt, nb)

    def codegen(context, builder, signature, args):
        acc_a, u_a, o_a, h_a, cnt_v, nb_v = args
        i64, f32 = ir.IntType(64), ir.FloatType()
        v32f = ir.VectorType(f32, 32)
        arr = lambda k, v: context.make_array(signature.args[k])(context, builder, v)
        A, U, O, H = arr(0, acc_a), arr(1, u_a), arr(2, o_a), arr(3, h_a)
        accp = builder.bitcast(A.data, v32f.as_pointer())
        ub = builder.bitcast(U.data, _i8.as_pointer())
        cnt = builder.sext(cnt_v, i64) if cnt_v.type.width < 64 else cnt_v
        nb = builder.sext(nb_v, i64) if nb_v.type.width < 64 else nb_v
        with cgutils.for_range(builder, nb) as blk:
            b = blk.index
            ap = builder.gep(accp, [b])
            total = cgutils.alloca_once_value(builder, builder.load(ap, align=4))
            with cgutils.for_range(builder, cnt) as grp:
                g = grp.index
                base = builder.gep(ub, [builder.load(builder.gep(O.data, [g]))])
                f = _splat_f(builder, builder.load(builder.gep(H.data, [g])), 32)
                qp = builder.gep(base, [builder.mul(b, ir.Constant(i64, 128))])  # 32 float32 a block
                qv = builder.load(builder.bitcast(qp, v32f.as_pointer()), align=1)
                builder.store(builder.fadd(builder.load(total), builder.fmul(qv, f)), total)
            builder.store(builder.load(total), ap, align=4)
        return context.get_dummy_value()

    return sig, codegen


def _gate_up_q4_0r(generic):
    """dot_gate_up_q4_0r through vpdpbusd (x86 AVX512-VNNI only), or generic: its sums in generic IR."""
    @intrinsic
    def dot_gate_up_q4_0r(typingctx, w, off, nb, xt, xoff, xd, xs, xdoff, pf, pf_lines):
        """(gate . x, up . x) for a neuron's gate and up rows, repacked Q4_0 (quant.repack_q4_0) and interleaved from
        byte off of w: each whole group of Q4_0R_GROUP blocks of the gate (144 bytes), then the up row's same group;
        then the gate's shorter last group, if any, and the up row's (ffn_pack.interleave_rows). One block loop
        over one stream of bytes: each block's activations (xt[xoff:], block scales and offset terms from xdoff, as
        dot_row_q4_0r_vnni reads them) are loaded once for both rows, and the rows' independent chains interleave. Each result is bit-identical to
        dot_row_q4_0r_vnni of that row.
        Where pf >= 0, whole group g also prefetches pf_lines cache lines of w from byte pf + 64 pf_lines g:
        pack_ffn's prefetch of a later unit, issued at the pace of the compute (see sparse.PREFETCH_AHEAD)."""
        sig = types.UniTuple(types.float32, 2)(w, off, nb, xt, xoff, xd, xs, xdoff, pf, pf_lines)

        def codegen(context, builder, signature, args):
            wp, xp, xdp, xbp, dp = _vnni_dot_setup(context, builder, signature, args[:8], 1, generic)
            gb = 18 * Q4_0R_GROUP
            i64 = ir.IntType(64)
            c = lambda v: ir.Constant(i64, v)
            w0 = _ptr(context, builder, signature.args[0], args[0], c(0))
            pf, k = [builder.sext(v, i64) if v.type.width < 64 else v for v in args[8:10]]

            def each_group(g):
                with builder.if_then(builder.icmp_signed(">=", pf, c(0))):
                    at = builder.gep(w0, [builder.add(pf, builder.mul(builder.mul(g, k), c(64)))])
                    with cgutils.for_range(builder, k) as line:
                        _prefetch_line(builder, builder.gep(at, [builder.mul(line.index, c(64))]))

            tail = lambda groups, m: [builder.gep(wp, [builder.mul(groups, c(2 * gb))]),
                                      builder.gep(wp, [builder.add(builder.mul(groups, c(2 * gb)), builder.mul(m, c(18)))])]
            dots = [d[0] for d in _q4_0r_dots(builder, [wp, builder.gep(wp, [c(gb)])], args[2], [xp], [xdp], [xbp], dp,
                                              2 * gb, tail, each_group)]
            return context.make_tuple(builder, signature.return_type, dots)

        return sig, codegen if generic else _vnni_or_trap(codegen)

    return dot_gate_up_q4_0r


# the VNNI form, and the generic one (legacy._q4_0r_group_sums' generic-IR sums: the same results)
dot_gate_up_q4_0r_vnni, dot_gate_up_q4_0r_generic = _gate_up_q4_0r(False), _gate_up_q4_0r(True)


# The AVX2 exact axpy reads up to 32 columns side by side, 32 bytes of each a step: more streams than the L1's
# prefetcher follows. Each step also prefetches into L1 the bytes EXACT_L1_AHEAD on in the columns it reads (the
# next channel block's come into L2 by pf). teal 50% decode on TinyLlama Q4_0, alternating processes, 4 pairs:
# 37.8 / 33.9 / 37.5 / 38.3 -> 39.6 / 37.8 / 41.1 / 38.3 t/s (64 and 192 bytes ahead measured no better).
EXACT_L1_AHEAD = 128
EXACT_PREFETCH = 32  # the units axpy_q4_exact's pf names (the VNNI form reads the first AXPY_Q4_COLUMNS)
AXPY_Q4_COLUMNS = 8  # down columns axpy_q4_vnni adds per call: two vpdpbusd per half block into one int32 sum


@intrinsic
def coefs_q4_vnni(typingctx, u, offs, h, nb, qbytes, cw, cz, cs):
    """axpy_q4_vnni's int8 coefficients for AXPY_Q4_COLUMNS down columns at u[offs[g]:] (nb blocks of 16 quant
    bytes, then nb fp16 scales from byte qbytes): c_g = h[g] * scale(g, b), cs[b] = max_g
    |c_g| / 127, q_g = rint(c_g * 127 / max) (0 where the max is 0), cw[k nb + b] = q_4k..q_4k+3 as bytes of one
    int32, cz[b] = -8 * sum_g q_g; 16 blocks a vector, then the rest one at a time. Plain vector IR (no x86
    instruction): numba left the scalar loop over blocks unvectorized, 8.6 ns a neuron for four columns and 15.6
    for eight, against 7.2 here (from L2, separate runs; the max as a tree of selects: 12.8 with llvm.maxnum in
    a chain)."""
    sig = types.void(u, offs, h, nb, qbytes, cw, cz, cs)
    G = AXPY_Q4_COLUMNS

    def codegen(context, builder, signature, args):
        u_a, o_a, h_a, nb_v, qb_v, cw_a, cz_a, cs_a = args
        i64, f32, f16 = ir.IntType(64), ir.FloatType(), ir.HalfType()
        c = lambda v: ir.Constant(i64, v)
        arr = lambda k, v: context.make_array(signature.args[k])(context, builder, v)
        O, H, CW, CZ, CS = arr(1, o_a), arr(2, h_a), arr(5, cw_a), arr(6, cz_a), arr(7, cs_a)
        ub = builder.bitcast(arr(0, u_a).data, _i8.as_pointer())
        nb = builder.sext(nb_v, i64) if nb_v.type.width < 64 else nb_v
        qb = builder.sext(qb_v, i64) if qb_v.type.width < 64 else qb_v
        sp = [builder.bitcast(builder.gep(ub, [builder.add(builder.load(builder.gep(O.data, [c(g)])), qb)]), f16.as_pointer())
              for g in range(G)]
        hs = [builder.load(builder.gep(H.data, [c(g)])) for g in range(G)]

        def blocks(b, W):  # blocks b .. b + W - 1
            vf, vi = ir.VectorType(f32, W), ir.VectorType(_i32, W)
            fn = lambda name, ty: cgutils.get_or_insert_function(builder.module, ir.FunctionType(ty, [ty]), f"llvm.{name}.v{W}f32")
            vec = lambda p, ty: builder.bitcast(builder.gep(p, [b]), ty.as_pointer())
            cg = [builder.fmul(builder.fpext(builder.load(vec(sp[g], ir.VectorType(f16, W)), align=1), vf),
                               _splat_f(builder, hs[g], W)) for g in range(G)]
            m = [builder.call(fn("fabs", vf), [x]) for x in cg]
            while len(m) > 1:  # a tree of plain compares and selects (vmaxps; maxnum's NaN rules cost 3 instructions)
                m = [builder.select(builder.fcmp_ordered(">", a, b), a, b) for a, b in zip(m[0::2], m[1::2])]
            m = m[0]
            zero = ir.Constant(vf, [0.0] * W)
            pos = builder.fcmp_ordered(">", m, zero)
            inv = builder.select(pos, builder.fdiv(ir.Constant(vf, [127.0] * W), builder.select(pos, m, ir.Constant(vf, [1.0] * W))), zero)
            q = [builder.fptosi(builder.call(fn("rint", vf), [builder.fmul(x, inv)]), vi) for x in cg]
            total = q[0]
            for g in range(1, G):
                total = builder.add(total, q[g])
            builder.store(builder.mul(total, _splat(W, -8, _i32)), vec(CZ.data, vi), align=4)
            builder.store(builder.fmul(m, ir.Constant(vf, [1.0 / 127.0] * W)), vec(CS.data, vf), align=4)
            for k in range(G // 4):
                w = builder.and_(q[4 * k], _splat(W, 255, _i32))
                for j in range(1, 4):
                    w = builder.or_(w, builder.shl(builder.and_(q[4 * k + j], _splat(W, 255, _i32)), _splat(W, 8 * j, _i32)))
                at = builder.add(builder.mul(nb, c(k)), b)
                builder.store(w, builder.bitcast(builder.gep(CW.data, [at]), vi.as_pointer()), align=4)

        full = builder.udiv(nb, c(16))
        with cgutils.for_range(builder, full) as loop:
            blocks(builder.mul(loop.index, c(16)), 16)
        with cgutils.for_range_slice(builder, builder.mul(full, c(16)), nb, c(1)) as (b, _):
            blocks(b, 1)
        return context.get_dummy_value()

    return sig, codegen


def _dp16(builder, generic, kind):
    """(acc, a, x) -> acc + per int32 lane the dot of a's 4 bytes with x's 4 signed ones (<16 x i32> each). kind
    "unsigned": a's bytes unsigned, vpdpbusd (512-bit), or on the generic route the same sums from two 8-lane halves
    (ir._dpbusd_generic); "nibbles": a's bytes below 16, on the generic route with AVX2 pmaddubsw and pmaddwd (pairs
    of products within int16: 2 x 15 x 127); "signed" (the generic route with AVX2 only): a's bytes signed, within
    +-127, through pmaddubsw(|x|, a with x's signs) (2 x 127 x 127 fits int16: nothing saturates)."""
    v16i = ir.VectorType(_i32, 16)
    if not generic:
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v16i, [v16i] * 3),
                                            "llvm.x86.avx512.vpdpbusd.512")
        return lambda acc, a, x: builder.call(fn, [acc, a, x])
    half = lambda v, h: builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_i32, 8), list(range(8 * h, 8 * h + 8))))
    join = lambda lo, hi: builder.shuffle_vector(lo, hi, ir.Constant(v16i, list(range(16))))
    if kind == "nibbles" and X86_AVX2:
        def dp(acc, a, x):
            s = [_pmaddwd_ones(builder, _pmaddubsw(builder, half(a, h), half(x, h))) for h in range(2)]
            return builder.add(acc, join(*s))
    elif kind == "signed":
        v32i8 = ir.VectorType(_i8, 32)
        sign = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v32i8, [v32i8, v32i8]),
                                              "llvm.x86.avx2.psign.b")
        absb = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v32i8, [v32i8, ir.IntType(1)]),
                                              "llvm.abs.v32i8")

        def dp(acc, a, x):
            s = []
            for h in range(2):
                ah, xh = builder.bitcast(half(a, h), v32i8), builder.bitcast(half(x, h), v32i8)
                s.append(_pmaddwd_ones(builder, _pmaddubsw(builder, builder.call(absb, [xh, ir.Constant(ir.IntType(1), 0)]),
                                                           builder.call(sign, [ah, xh]))))
            return builder.add(acc, join(*s))
    else:
        fn8 = _dpbusd_generic(builder)

        def dp(acc, a, x):
            return join(*[builder.call(fn8, [half(acc, h), half(a, h), half(x, h)]) for h in range(2)])
    return dp


_UNPACK8 = [[16 * l + 8 * h + i + 32 * s for l in range(2) for i in range(8) for s in range(2)] for h in range(2)]
_UNPACK16 = [[8 * l + 4 * h + i + 16 * s for l in range(2) for i in range(4) for s in range(2)] for h in range(2)]


def _pair_sums(builder, sums, q, coef):
    """sums[2 h + n] (<16 x i16>) += pmaddubsw of two 4-bit columns' 32 bytes q (two blocks of 16, Q4_0's nibble order)
    interleaved by byte (vpunpck{l,h}bw: in-lane, so no cross-lane byte shuffle, which AVX2 lacks) with coef, the
    pair's two int8 coefficients in each int16 lane (<32 x i8>). Lane j of sums[2 h + n]: block j // 8's output
    8 h + 16 n + j % 8, summed over the pairs (each lane a sum of two products: 2 x 15 x 127)."""
    shuf = lambda a, b, idx: builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(_i32, len(idx)), idx))
    for h in range(2):
        t = shuf(q[0], q[1], _UNPACK8[h])  # byte 2i / 2i + 1: the two columns' byte i
        nib = (builder.and_(t, _splat(32, 15)), builder.lshr(t, _splat(32, 4)))
        for n in range(2):
            builder.store(builder.add(builder.load(sums[2 * h + n]), _pmaddubsw(builder, nib[n], coef)), sums[2 * h + n])


def _pair_outputs(builder, x, y, k, blk):
    """The int32 sums of 8 outputs of block blk (0 or 1) from _pair_sums' sums[k] of two groups of pairs x and y:
    interleaved by int16 lane (in-lane again) and added by pmaddwd, then the lanes' in-lane order undone; outputs
    8 (k // 2) + 16 (k % 2) .. + 7."""
    shuf = lambda a, b, idx: builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(_i32, len(idx)), idx))
    w = [_pmaddwd_ones(builder, shuf(x, y, _UNPACK16[h])) for h in range(2)]  # [b: 4h..4h+3 | b + 1: same]
    return shuf(w[0], w[1], [4 * blk + i for i in range(4)] + [8 + 4 * blk + i for i in range(4)])


def _axpy_q4_avx2(context, builder, signature, args):
    """axpy_q4_generic on AVX2: its 8 columns as 4 pairs through _pair_sums (no 4-column transpose), pairs 0-1 and
    2-3 summed in int16 (4 x 2 x 15 x 127 < 2^15), the two halves met in int32 by _pair_outputs; two output blocks a
    step. The same int32 sums as the portable form."""
    acc_a, u_a, o_a, cw_a, cz_a, cs_a, nb_v, pf_a = args
    i64, f32 = ir.IntType(64), ir.FloatType()
    c = lambda v: ir.Constant(i64, v)
    v8f, v16w, v32b = ir.VectorType(f32, 8), ir.VectorType(ir.IntType(16), 16), ir.VectorType(_i8, 32)
    arr = lambda k, v: context.make_array(signature.args[k])(context, builder, v)
    A, U, O, CW, CZ, CS, PF = [arr(k, v) for k, v in enumerate(args[:6])] + [arr(7, pf_a)]
    accp = builder.bitcast(A.data, v8f.as_pointer())
    ub = builder.bitcast(U.data, _i8.as_pointer())
    nb = builder.sext(nb_v, i64) if nb_v.type.width < 64 else nb_v
    fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v8f, [v8f] * 3), "llvm.fma.v8f32")
    cols = [builder.gep(ub, [builder.load(builder.gep(O.data, [c(g)]))]) for g in range(AXPY_Q4_COLUMNS)]
    sums = [[cgutils.alloca_once(builder, v16w) for _ in range(4)] for _ in range(2)]
    zero16 = ir.Constant(v16w, [0] * 16)

    def step(b, two):
        for k in range(4 if two else 2):  # two lines of the later units a block, as axpy_q4_vnni
            _unit_line_ahead(builder, ub, PF, builder.add(builder.mul(b, c(2)), c(k)))
        blocks = [b, builder.add(b, c(1))] if two else [b, b]
        for half in range(2):
            for k in range(4):
                builder.store(zero16, sums[half][k])
            for p in (2 * half, 2 * half + 1):
                pair = [builder.trunc(builder.lshr(builder.load(builder.gep(CW.data, [builder.add(builder.mul(nb, c(p // 2)), x)])),
                                                   ir.Constant(_i32, 16 * (p % 2))), ir.IntType(16)) for x in blocks]
                coef = builder.bitcast(builder.shuffle_vector(_splat_f(builder, pair[0], 16), _splat_f(builder, pair[1], 16),
                                                              ir.Constant(ir.VectorType(_i32, 16), [0] * 8 + [16] * 8)), v32b)
                at = [builder.gep(cols[2 * p + g], [builder.mul(b, c(16))]) for g in range(2)]
                if two:
                    q = [_vload(builder, x, 32) for x in at]
                else:  # one block: the other half zero (its sums are not stored)
                    q = [builder.shuffle_vector(_vload(builder, x, 16), ir.Constant(ir.VectorType(_i8, 16), [0] * 16),
                                                ir.Constant(ir.VectorType(_i32, 32), list(range(32)))) for x in at]
                _pair_sums(builder, sums[half], q, coef)
        for k in range(4):
            x, y = builder.load(sums[0][k]), builder.load(sums[1][k])
            for blk in range(2 if two else 1):
                o = builder.add(builder.mul(blocks[blk], c(4)), c(k // 2 + 2 * (k % 2)))  # 8 outputs from acc[8 o]
                total = builder.add(_pair_outputs(builder, x, y, k, blk),
                                    _splat_f(builder, builder.load(builder.gep(CZ.data, [blocks[blk]])), 8))
                scale = _splat_f(builder, builder.load(builder.gep(CS.data, [blocks[blk]])), 8)
                ap = builder.gep(accp, [o])
                builder.store(builder.call(fma, [builder.sitofp(total, v8f), scale, builder.load(ap, align=4)]), ap, align=4)

    with cgutils.for_range(builder, builder.udiv(nb, c(2))) as loop:
        step(builder.mul(loop.index, c(2)), True)
    with builder.if_then(builder.icmp_unsigned("!=", builder.urem(nb, c(2)), c(0))):
        step(builder.sub(nb, c(1)), False)
    return context.get_dummy_value()


def _axpy_i8_avx2(context, builder, signature, args):
    """axpy_i8_generic on AVX2: its 8 int8 columns as 4 pairs, each pair's 32 bytes of a block interleaved by byte
    (in-lane) and multiplied by pmaddubsw(|c|, w with c's signs) (the weights within +-127: a lane's two products fit
    int16, two lanes' would not), each two pairs' int16 sums met in int32 by an in-lane interleave and pmaddwd; one
    block a step. The same int32 sums as the portable form."""
    acc_a, u_a, o_a, cw_a, cz_a, cs_a, nb_v, pf_a = args
    i64, f32 = ir.IntType(64), ir.FloatType()
    c = lambda v: ir.Constant(i64, v)
    v8f, v32b = ir.VectorType(f32, 8), ir.VectorType(_i8, 32)
    arr = lambda k, v: context.make_array(signature.args[k])(context, builder, v)
    A, U, O, CW, CS, PF = arr(0, acc_a), arr(1, u_a), arr(2, o_a), arr(3, cw_a), arr(5, cs_a), arr(7, pf_a)
    accp = builder.bitcast(A.data, v8f.as_pointer())
    ub = builder.bitcast(U.data, _i8.as_pointer())
    nb = builder.sext(nb_v, i64) if nb_v.type.width < 64 else nb_v
    fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v8f, [v8f] * 3), "llvm.fma.v8f32")
    sign = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v32b, [v32b, v32b]), "llvm.x86.avx2.psign.b")
    absb = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v32b, [v32b, ir.IntType(1)]), "llvm.abs.v32i8")
    shuf = lambda a, b, idx: builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(_i32, len(idx)), idx))
    cols = [builder.gep(ub, [builder.load(builder.gep(O.data, [c(g)]))]) for g in range(AXPY_Q4_COLUMNS)]
    with cgutils.for_range(builder, nb) as blk:
        b = blk.index
        for k in range(2):  # two lines of the later units a block, as axpy_i8_vnni
            _unit_line_ahead(builder, ub, PF, builder.add(builder.mul(b, c(2)), c(k)))
        pairs = []  # per pair, per h: int16 lane j = output 8 h + j (j < 8), 16 + 8 h + j - 8 (j >= 8)
        for p in range(AXPY_Q4_COLUMNS // 2):
            word = builder.load(builder.gep(CW.data, [builder.add(builder.mul(nb, c(p // 2)), b)]))
            pair = builder.trunc(builder.lshr(word, ir.Constant(_i32, 16 * (p % 2))), ir.IntType(16))
            coef = builder.bitcast(_splat_f(builder, pair, 16), v32b)
            mag = builder.call(absb, [coef, ir.Constant(ir.IntType(1), 0)])
            q = [_vload(builder, builder.gep(cols[2 * p + g], [builder.mul(b, c(32))]), 32) for g in range(2)]
            pairs.append([_pmaddubsw(builder, mag, builder.call(sign, [shuf(q[0], q[1], _UNPACK8[h]), coef]))
                          for h in range(2)])
        scale = _splat_f(builder, builder.load(builder.gep(CS.data, [b])), 8)
        for h in range(2):
            # int32 lane m of part[h2]: output 8 h + 4 h2 + m (m < 4), 16 + 8 h + 4 h2 + m - 4 (m >= 4)
            part = [None, None]
            for h2 in range(2):
                for p in (0, 2):
                    d = _pmaddwd_ones(builder, shuf(pairs[p][h], pairs[p + 1][h], _UNPACK16[h2]))
                    part[h2] = d if part[h2] is None else builder.add(part[h2], d)
            for hi in range(2):  # outputs 8 h + 16 hi .. + 7
                total = shuf(part[0], part[1], [4 * hi + i for i in range(4)] + [8 + 4 * hi + i for i in range(4)])
                ap = builder.gep(accp, [builder.add(builder.mul(b, c(4)), c(h + 2 * hi))])
                builder.store(builder.call(fma, [builder.sitofp(total, v8f), scale, builder.load(ap, align=4)]), ap, align=4)
    return context.get_dummy_value()


def _axpy_vnni(int8, generic=False):
    """The codegen of axpy_q4_vnni (int8: axpy_i8_vnni's, int8 down columns; generic: vpdpbusd's arithmetic in
    generic vector IR, the same sums on every CPU; on AVX2 hosts the pair forms, _axpy_q4_avx2 / _axpy_i8_avx2)."""
    G, Q = AXPY_Q4_COLUMNS, AXPY_Q4_COLUMNS // 4
    if generic and X86_AVX2:
        return _axpy_i8_avx2 if int8 else _axpy_q4_avx2
    qb = 32 if int8 else 16  # quant bytes per block and column

    def codegen(context, builder, signature, args):
        acc_a, u_a, o_a, cw_a, cz_a, cs_a, nb_v, pf_a = args
        i64, f32 = ir.IntType(64), ir.FloatType()
        c = lambda v: ir.Constant(i64, v)
        v16f, v16i = ir.VectorType(f32, 16), ir.VectorType(_i32, 16)
        arr = lambda k, v: context.make_array(signature.args[k])(context, builder, v)
        A, U, O, CW, CZ, CS = arr(0, acc_a), arr(1, u_a), arr(2, o_a), arr(3, cw_a), arr(4, cz_a), arr(5, cs_a)
        PF = arr(7, pf_a)
        accp = builder.bitcast(A.data, v16f.as_pointer())
        ub = builder.bitcast(U.data, _i8.as_pointer())
        nb = builder.sext(nb_v, i64) if nb_v.type.width < 64 else nb_v
        signed = int8 and generic and X86_AVX2  # the int8 weights as they are (no + 128, no correction)
        dp = _dp16(builder, generic, "signed" if signed else "unsigned" if int8 else "nibbles")
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v16f, [v16f] * 3), "llvm.fma.v16f32")
        cols = [builder.gep(ub, [builder.load(builder.gep(O.data, [c(g)]))]) for g in range(G)]
        transpose = ir.Constant(ir.VectorType(_i32, 64), [16 * (j % 4) + j // 4 for j in range(64)])
        cat = lambda a, b: builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(_i32, 2 * a.type.count),
                                                                    list(range(2 * a.type.count))))
        with cgutils.for_range(builder, nb) as blk:
            b = blk.index
            for k in range(Q):
                v = builder.add(builder.mul(b, c(Q)), c(k))
                at = builder.load(builder.gep(PF.data, [builder.urem(v, c(G))]))
                with builder.if_then(builder.icmp_signed(">=", at, c(0))):
                    _prefetch_line(builder, builder.gep(ub, [builder.add(at, builder.mul(builder.udiv(v, c(G)), c(64)))]))
            cz = builder.load(builder.gep(CZ.data, [b]))  # -8 x the coefficients' sum
            if int8:  # the weights' sign bit flipped makes them w + 128: take 128 x the sum back out
                cz = builder.shl(cz, ir.Constant(_i32, 4))
            lanes = [_splat_f(builder, ir.Constant(_i32, 0) if signed else cz, 16)] * 2  # outputs 32b + 16h + (0..15)
            for k in range(Q):
                coef = builder.bitcast(_splat_f(builder, builder.load(builder.gep(CW.data, [builder.add(builder.mul(nb, c(k)), b)])),
                                                16), v16i)
                if int8:  # each 16 outputs' bytes of the 4 columns transposed: lane = one output's 4 weights
                    q = [_vload(builder, builder.gep(cols[4 * k + g], [builder.mul(b, c(qb))]), 32) for g in range(4)]
                    halves = []
                    for h in range(2):
                        part = [builder.shuffle_vector(x, x, ir.Constant(ir.VectorType(_i32, 16), list(range(16 * h, 16 * h + 16))))
                                for x in q]
                        t = builder.shuffle_vector(cat(cat(part[0], part[1]), cat(part[2], part[3])),
                                                   ir.Constant(ir.VectorType(_i8, 64), None), transpose)
                        halves.append(t if signed else builder.xor(t, _splat(64, -128)))
                else:
                    q = [_vload(builder, builder.gep(cols[4 * k + g], [builder.mul(b, c(qb))]), 16) for g in range(4)]
                    t = builder.shuffle_vector(cat(cat(q[0], q[1]), cat(q[2], q[3])),
                                               ir.Constant(ir.VectorType(_i8, 64), None), transpose)
                    halves = (builder.and_(t, _splat(64, 15)), builder.and_(builder.lshr(t, _splat(64, 4)), _splat(64, 15)))
                lanes = [dp(lanes[h], builder.bitcast(halves[h], v16i), coef) for h in range(2)]
            scale = _splat_f(builder, builder.load(builder.gep(CS.data, [b])), 16)
            for h in range(2):
                ap = builder.gep(accp, [builder.add(builder.mul(b, c(2)), c(h))])
                builder.store(builder.call(fma, [builder.sitofp(lanes[h], v16f), scale, builder.load(ap, align=4)]), ap, align=4)
        return context.get_dummy_value()

    return codegen


@intrinsic
def axpy_q4_vnni(typingctx, acc, u, offs, cw, cz, cs, nb, pf):
    """8 neurons' 4-bit down columns added at once through vpdpbusd (x86 AVX512-VNNI only, see the module note):
    acc[32b : 32b+32] += cs[b] * sum_g cq[g, b] * (nibbles of column g, block b), where the int8 cq[g, b] (h_g
    times the column's block scale, rounded with one scale cs[b] per block: see sparse._coefs_i8) are packed
    four to an int32, columns 4k..4k+3 in cw[k nb + b], and cz[b] = -8 * sum_g cq[g, b] takes Q4_0's nibble
    offset back out. Per block and four columns, their 16 bytes are transposed into one 64-byte register (byte
    4k+g = column g's byte k: vpermb) so each int32 lane holds one output's 4 weights; the nibbles are split,
    and the two quads' vpdpbusd sum into one int32 lane per output, converted and added with one FMA per 16
    outputs. From L2, 29-33 against 38.5 ns a neuron for the 4-column form (whose per-quad convert, multiply and
    acc load/store this halves); the float axpy took 2.5x the 4-column form. The rounding adds at most 1/254 of
    the group's largest term to each output per block.
    pf (8,) int64: block b also prefetches two of u's cache lines, v = 2b and 2b + 1 at byte pf[v % 8] + 64
    (v // 8), none where pf[v % 8] < 0: pack_ffn's prefetch of later units' last lines, at the pace of the
    compute (nb / 4 lines of each unit per call)."""
    return types.void(acc, u, offs, cw, cz, cs, nb, pf), _vnni_or_trap(_axpy_vnni(False))


@intrinsic
def axpy_i8_vnni(typingctx, acc, u, offs, cw, cz, cs, nb, pf):
    """axpy_q4_vnni for int8 down columns (32 quant bytes a block, then the fp16 scales; the coefficients from
    coefs_q4_vnni as for 4-bit ones): each half block's 16 bytes of the 4 columns transposed into one register,
    the weights' sign bit flipped (w + 128, unsigned for vpdpbusd) and 128 x the coefficients' sum taken out in
    the accumulator's start. Replaced a float axpy on VNNI CPUs: a Q6_K or Q8_0 model's packs."""
    return types.void(acc, u, offs, cw, cz, cs, nb, pf), _vnni_or_trap(_axpy_vnni(True))


@intrinsic
def axpy_q4_generic(typingctx, acc, u, offs, cw, cz, cs, nb, pf):
    """axpy_q4_vnni with vpdpbusd's arithmetic in generic vector IR (_dp16): the same sums on every CPU."""
    return types.void(acc, u, offs, cw, cz, cs, nb, pf), _axpy_vnni(False, generic=True)


@intrinsic
def axpy_i8_generic(typingctx, acc, u, offs, cw, cz, cs, nb, pf):
    """axpy_i8_vnni with vpdpbusd's arithmetic in generic vector IR (_dp16): the same sums on every CPU."""
    return types.void(acc, u, offs, cw, cz, cs, nb, pf), _axpy_vnni(True, generic=True)


def _unit_line_ahead(builder, ub, PF, v):
    """Prefetch line v // 8 of the unit at byte PF[v % 8] of ub (none where that is negative): the axpys' prefetch of
    later units, two lines a block of 32 outputs, at the pace of the compute (see axpy_q4_vnni)."""
    i64 = ir.IntType(64)
    at = builder.load(builder.gep(PF.data, [builder.urem(v, ir.Constant(i64, AXPY_Q4_COLUMNS))]))
    with builder.if_then(builder.icmp_signed(">=", at, ir.Constant(i64, 0))):
        line = builder.mul(builder.udiv(v, ir.Constant(i64, AXPY_Q4_COLUMNS)), ir.Constant(i64, 64))
        _prefetch_line(builder, builder.gep(ub, [builder.add(at, line)]))


def _exact_frame(context, builder, signature, args):
    """axpy_q4_exact's arguments as both forms read them: the arrays acc, u, offs, cw, pf; u's bytes; the scales' and
    offsets' byte pointers (offsets: none where moff < 0, has_m); nb and nq as int64."""
    _, _, _, nq_v, _, _, _, sc_a, soff, mn_a, moff, _, nb_v, _ = args
    i64 = ir.IntType(64)
    arr = lambda k: context.make_array(signature.args[k])(context, builder, args[k])
    A, U, O, CW, PF = arr(0), arr(1), arr(2), arr(4), arr(13)
    ub = builder.bitcast(U.data, _i8.as_pointer())
    sb = builder.gep(builder.bitcast(arr(7).data, _i8.as_pointer()), [soff])
    has_m = builder.icmp_signed(">=", moff, ir.Constant(i64, 0))
    mb = builder.gep(builder.bitcast(arr(9).data, _i8.as_pointer()), [builder.select(has_m, moff, ir.Constant(i64, 0))])
    wide = lambda v: builder.sext(v, i64) if v.type.width < 64 else v
    return A, U, O, CW, PF, ub, sb, mb, has_m, wide(nb_v), wide(nq_v)


def _axpy_exact(generic):
    """The codegen of axpy_q4_exact (generic: vpdpbusd's arithmetic in generic vector IR; on AVX2 hosts the pair
    form, _axpy_exact_avx2)."""
    if generic and X86_AVX2:
        return _axpy_exact_avx2

    def codegen(context, builder, signature, args):
        _, _, _, _, _, cz_v, a_v, _, _, _, _, xs, _, _ = args
        A, U, O, CW, PF, ub, sb, mb, has_m, nb, nq = _exact_frame(context, builder, signature, args)
        i64, f32, f16 = ir.IntType(64), ir.FloatType(), ir.HalfType()
        c = lambda v: ir.Constant(i64, v)
        v16f, v16i, v16h = ir.VectorType(f32, 16), ir.VectorType(_i32, 16), ir.VectorType(f16, 16)
        accp = builder.bitcast(A.data, v16f.as_pointer())
        dp = _dp16(builder, generic, "nibbles")
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v16f, [v16f] * 3), "llvm.fma.v16f32")
        transpose = ir.Constant(ir.VectorType(_i32, 64), [16 * (j % 4) + j // 4 for j in range(64)])
        cat = lambda a, b: builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(_i32, 2 * a.type.count),
                                                                    list(range(2 * a.type.count))))
        av, xsv = _splat_f(builder, a_v, 16), _splat_f(builder, xs, 16)
        lanes = [cgutils.alloca_once(builder, v16i) for _ in range(2)]
        with cgutils.for_range(builder, nb) as blk:
            b = blk.index
            for k in range(2):  # two lines of the later units a block, as axpy_q4_vnni
                _unit_line_ahead(builder, ub, PF, builder.add(builder.mul(b, c(2)), c(k)))
            for h in range(2):
                builder.store(_splat_f(builder, cz_v, 16), lanes[h])
            with cgutils.for_range(builder, nq) as quad:
                k = quad.index
                coef = builder.bitcast(_splat_f(builder, builder.load(builder.gep(CW.data, [k])), 16), v16i)
                q = [_vload(builder, builder.gep(ub, [builder.add(builder.load(builder.gep(
                    O.data, [builder.add(builder.mul(k, c(4)), c(g))])), builder.mul(b, c(16)))]), 16) for g in range(4)]
                t = builder.shuffle_vector(cat(cat(q[0], q[1]), cat(q[2], q[3])),
                                           ir.Constant(ir.VectorType(_i8, 64), None), transpose)
                halves = (builder.and_(t, _splat(64, 15)), builder.and_(builder.lshr(t, _splat(64, 4)), _splat(64, 15)))
                for h in range(2):
                    builder.store(dp(builder.load(lanes[h]), builder.bitcast(halves[h], v16i), coef), lanes[h])
            for h in range(2):
                o = builder.add(builder.mul(b, c(2)), c(h))  # 16 outputs
                half16 = lambda base: builder.fpext(builder.load(builder.bitcast(builder.gep(base, [builder.mul(o, c(32))]),
                                                                             v16h.as_pointer()), align=1), v16f)
                ap = builder.gep(accp, [o])
                y = builder.call(fma, [builder.fmul(builder.sitofp(builder.load(lanes[h]), v16f), av), half16(sb),
                                       builder.load(ap, align=4)])
                m = builder.select(has_m, half16(mb), ir.Constant(v16f, [0.0] * 16))
                builder.store(builder.fsub(y, builder.fmul(m, xsv)), ap, align=4)
        return context.get_dummy_value()

    return codegen


def _axpy_exact_avx2(context, builder, signature, args):
    """axpy_q4_exact on AVX2 without a transpose: channel pairs through _pair_sums (the 4-channel transpose spent ~20
    instructions on cross-lane byte shuffles, which AVX2 lacks), the pairs of 16 channels added in int16 (16 x 15 x
    127 < 2^15), the two halves met in int32 by _pair_outputs where the outputs' scales are applied; two output blocks
    (32 bytes of each column) a step. The same int32 sums as the portable form."""
    _, _, _, _, _, cz_v, a_v, _, _, _, _, xs, _, _ = args
    A, U, O, CW, PF, ub, sb, mb, has_m, nb, nq = _exact_frame(context, builder, signature, args)
    i64, f32, f16 = ir.IntType(64), ir.FloatType(), ir.HalfType()
    c = lambda v: ir.Constant(i64, v)
    v8f, v8h = ir.VectorType(f32, 8), ir.VectorType(f16, 8)
    v32b, v16w = ir.VectorType(_i8, 32), ir.VectorType(ir.IntType(16), 16)
    accp = builder.bitcast(A.data, v8f.as_pointer())
    pairs = builder.mul(nq, c(2))
    fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v8f, [v8f] * 3), "llvm.fma.v8f32")
    shuf = lambda a, b, idx: builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(_i32, len(idx)), idx))
    av, xsv, czv = _splat_f(builder, a_v, 8), _splat_f(builder, xs, 8), _splat_f(builder, cz_v, 8)
    zero16 = ir.Constant(v16w, [0] * 16)
    n_pf = cgutils.alloca_once_value(builder, c(0))  # pf's units: its entries up to the first negative one
    with cgutils.for_range(builder, c(EXACT_PREFETCH)) as loop:
        ok = builder.and_(builder.icmp_signed("==", builder.load(n_pf), loop.index),
                          builder.icmp_signed(">=", builder.load(builder.gep(PF.data, [loop.index])), c(0)))
        builder.store(builder.select(ok, builder.add(loop.index, c(1)), builder.load(n_pf)), n_pf)
    n_pf = builder.load(n_pf)
    # sums[half][k]: channels 0-15 / 16-31, k = 2 (lo / hi bytes of the column block) + (lo / hi nibble)
    sums = [[cgutils.alloca_once(builder, v16w) for _ in range(4)] for _ in range(2)]

    def step(b, two):
        """Output blocks b and (two) b + 1."""
        # the next call's units (the first n_pf of pf), each advancing 32 bytes a step as these do: step s prefetches
        # line s // 2 of the units i = s mod 2, s mod 2 + 2, ...
        s = builder.udiv(b, c(2))
        line = builder.mul(builder.udiv(s, c(2)), c(64))
        with cgutils.for_range_slice(builder, builder.urem(s, c(2)), n_pf, c(2)) as (i, _):
            _prefetch_line(builder, builder.gep(ub, [builder.add(builder.load(builder.gep(PF.data, [i])), line)]))
        for half in range(2):
            for k in range(4):
                builder.store(zero16, sums[half][k])
            lo = c(8 * half)
            hi = builder.select(builder.icmp_signed("<", pairs, c(8 * half + 8)), pairs, c(8 * half + 8))
            with cgutils.for_range_slice(builder, lo, builder.select(builder.icmp_signed("<", hi, lo), lo, hi), c(1)) as (p, _):
                word = builder.load(builder.gep(CW.data, [builder.udiv(p, c(2))]))
                pair = builder.trunc(builder.lshr(word, builder.trunc(builder.mul(builder.urem(p, c(2)), c(16)), _i32)),
                                     ir.IntType(16))
                coef = builder.bitcast(_splat_f(builder, pair, 16), v32b)
                col = lambda g: builder.gep(ub, [builder.add(builder.load(builder.gep(O.data, [builder.add(builder.mul(p, c(2)), c(g))])),
                                                             builder.mul(b, c(16)))])
                if two:
                    for g in range(2):  # (see EXACT_L1_AHEAD)
                        _prefetch_line(builder, builder.gep(col(g), [c(EXACT_L1_AHEAD)]), locality=3)
                    q = [_vload(builder, col(g), 32) for g in range(2)]
                else:  # one block: the other half zero (its sums are not stored)
                    q = [shuf(_vload(builder, col(g), 16), ir.Constant(ir.VectorType(_i8, 16), [0] * 16), list(range(32)))
                         for g in range(2)]
                _pair_sums(builder, sums[half], q, coef)
        for k in range(4):
            x, y = builder.load(sums[0][k]), builder.load(sums[1][k])
            for blk in range(2 if two else 1):
                o = builder.add(builder.mul(b, c(4)), c(4 * blk + k // 2 + 2 * (k % 2)))  # 8 outputs from acc[8 o]
                total = builder.add(_pair_outputs(builder, x, y, k, blk), czv)
                h8 = lambda base: builder.fpext(builder.load(builder.bitcast(builder.gep(base, [builder.mul(o, c(16))]),
                                                                         v8h.as_pointer()), align=1), v8f)
                ap = builder.gep(accp, [o])
                r = builder.call(fma, [builder.fmul(builder.sitofp(total, v8f), av), h8(sb), builder.load(ap, align=4)])
                m = builder.select(has_m, h8(mb), ir.Constant(v8f, [0.0] * 8))
                builder.store(builder.fsub(r, builder.fmul(m, xsv)), ap, align=4)

    with cgutils.for_range(builder, builder.udiv(nb, c(2))) as loop:
        step(builder.mul(loop.index, c(2)), True)
    with builder.if_then(builder.icmp_unsigned("!=", builder.urem(nb, c(2)), c(0))):
        step(builder.sub(nb, c(1)), False)
    return context.get_dummy_value()


_EXACT_DOC = """acc[32b + i] += a * s(b, i) * sum_g c_g * (nibble(g, b, i) - 8) - m(b, i) * x_sum over nb blocks of 32
outputs: up to 32 kept channels of one channel block of an exact 4-bit column pack at once (teal.ColumnPack, kind
EXACT_Q4), in nq quads: their units at byte offsets offs[4k + g] of u (Q4_0's nibble order, 16 bytes a block), their
int8 coefficients four to an int32 in cw[k] (the same for every output block), cz = -8 x the coefficients' sum, a the
coefficients' scale; s and m the source rows' fp16 scale and offset at byte soff of sc and moff of mn (moff < 0:
none), x_sum the channels' values' sum. The integer sums of all the quads stay in registers, and each output's scale
is applied once per channel block. pf (EXACT_PREFETCH,) int64: the next call's units, compact, -1 after the last: the
generic form prefetches all of each as it reads its own, the VNNI form the first 8 as axpy_q4_vnni does."""


@intrinsic
def axpy_q4_exact_vnni(typingctx, acc, u, offs, nq, cw, cz, a, sc, soff, mn, moff, x_sum, nb, pf):
    return (types.void(acc, u, offs, nq, cw, cz, a, sc, soff, mn, moff, x_sum, nb, pf),
            _vnni_or_trap(_axpy_exact(False)))


@intrinsic
def axpy_q4_exact_generic(typingctx, acc, u, offs, nq, cw, cz, a, sc, soff, mn, moff, x_sum, nb, pf):
    return types.void(acc, u, offs, nq, cw, cz, a, sc, soff, mn, moff, x_sum, nb, pf), _axpy_exact(True)


axpy_q4_exact_vnni.__doc__ = _EXACT_DOC
axpy_q4_exact_generic.__doc__ = _EXACT_DOC + " Generic IR: the same sums on every CPU."
