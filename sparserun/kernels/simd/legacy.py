"""Dots of the 32-value block types: Q4_0 (and its repacked Q4_0R), Q4_1, Q5_0, Q5_1, Q8_0, and float32 rows.

VNNI route (x86 AVX512-VNNI): vpdpbusd on unsigned weight bytes and signed activations, the offset folded in from
the activations' block sums, results as llama.cpp's horizontal order (_hsum8_ggml) where parity asks for it. Generic
route (every other CPU): Q4_0, Q5_0, Q4_1 and Q5_1 run the VNNI dots' code with vpdpbusd's sums in generic vector IR
(pmaddubsw on AVX2: ir._dpbusd_small), identical results; Q8_0 widens its quants to int16 against activations
stored as int16, pairwise multiply-adds that LLVM lowers to vpmaddwd (_row_dot).
"""
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic
from .ir import (Q4_0R_GROUP, X86_AVX2, _dots, _dpbusd_generic, _generic, _pmaddubsw, _pmaddwd_ones, _vpdpbusd, _even_odd_add, _fma, _half_splat, _hsum8, _hsum8_ggml, _i16, _i32, _i8, _nibbles32,
    _ptr, _routes, _row_intrinsic, _signed, _splat, _splat_f, _tokens_intrinsic, _vload, _vnni_or_trap)

def _row_dot(context, builder, sig, args, block_bytes, block_lanes):
    """Shared body of the row-dot intrinsics: sum over nb blocks of d_w[b] * d_x[b] * idot(b), with
    an <8 x float> accumulator and one horizontal reduction at the end (as llama.cpp's AVX2 code)."""
    w, woff, nb, x, xoff, xd, xdoff = args
    f32, v8f = ir.FloatType(), ir.VectorType(ir.FloatType(), 8)
    wp = _ptr(context, builder, sig.args[0], w, woff)
    xp = _ptr(context, builder, sig.args[3], x, builder.mul(xoff, ir.Constant(xoff.type, 2)))  # int16 elements
    xdp = builder.bitcast(_ptr(context, builder, sig.args[5], xd, builder.mul(xdoff, ir.Constant(xdoff.type, 4))),
                          f32.as_pointer())
    acc = cgutils.alloca_once_value(builder, ir.Constant(v8f, [0.0] * 8))
    with cgutils.for_range(builder, nb) as loop:
        b = loop.index
        pb = builder.gep(wp, [builder.mul(b, ir.Constant(b.type, block_bytes))])
        xb = builder.gep(xp, [builder.mul(b, ir.Constant(b.type, 64))])  # 32 int16 per block
        d_x = builder.load(builder.gep(xdp, [b]), align=4)
        lanes = block_lanes(builder, builder.gep(pb, [ir.Constant(_i32, 2)]), xb)  # <8 x i32>
        splat = builder.fmul(_half_splat(builder, pb), _splat_f(builder, d_x))  # d_w * d_x in every lane
        prod = builder.fmul(builder.sitofp(lanes, v8f), splat)
        builder.store(builder.fadd(builder.load(acc), prod), acc)
    return _hsum8(builder, builder.load(acc))


def _x_halves(builder, xp):
    """The two 16-lane halves of an activation block of 32 int16 at xp."""
    v16i16 = ir.VectorType(_i16, 16)
    p = builder.bitcast(xp, v16i16.as_pointer())
    return builder.load(p, align=2), builder.load(builder.gep(p, [ir.Constant(_i32, 1)]), align=2)


def _widen_madd(builder, q, x):
    """<16 x i8> weights q and <16 x i16> activations x -> <8 x i32> pairwise sums of products
    (pmaddwd after sign-extending q to i16)."""
    v16i16, v16i32 = ir.VectorType(_i16, 16), ir.VectorType(_i32, 16)
    prod = builder.mul(builder.sext(builder.sext(q, v16i16), v16i32), builder.sext(x, v16i32))
    return _even_odd_add(builder, prod)


def _q8_0_lanes(builder, qp, xp):
    xlo, xhi = _x_halves(builder, xp)
    qhi = _vload(builder, builder.gep(qp, [ir.Constant(_i32, 16)]), 16)
    return builder.add(_widen_madd(builder, _vload(builder, qp, 16), xlo), _widen_madd(builder, qhi, xhi))


def _row_dot_intrinsic(block_bytes, block_lanes, doc):
    @intrinsic
    def row_dot(typingctx, w, woff, nb, x, xoff, xd, xdoff):
        sig = types.float32(w, woff, nb, x, xoff, xd, xdoff)

        def codegen(context, builder, signature, args):
            return _row_dot(context, builder, signature, args, block_bytes, block_lanes)

        return sig, codegen

    row_dot.__doc__ = doc
    return row_dot


_ROW_DOT_DOC = """Dot of {name} blocks at w+woff (nb blocks of {bb} bytes: fp16 scale, then quants) with
activations rounded to int8 and stored as int16 at x[xoff:] (flat element index, 32 per block; kept
widened so the row loop only widens the weights), whose float32 block scales are xd[xdoff : xdoff+nb]."""
dot_row_q8_0 = _row_dot_intrinsic(34, _q8_0_lanes, _ROW_DOT_DOC.format(name="Q8_0", bb=34))  # generic route


@intrinsic
def dot_row_f32(typingctx, w, woff, n, x):
    """Dot of the n float32 values at w's byte offset woff (any alignment) with x's first n values (a
    float32 array, C-contiguous): <8 x float> loads and accumulator, one horizontal sum, a scalar tail."""
    sig = types.float32(w, woff, n, x)

    def codegen(context, builder, signature, args):
        w_a, woff_v, n_v, x_a = args
        f32, v8f = ir.FloatType(), ir.VectorType(ir.FloatType(), 8)
        i64 = ir.IntType(64)
        wp = builder.bitcast(_ptr(context, builder, signature.args[0], w_a, woff_v), f32.as_pointer())
        xp = builder.bitcast(context.make_array(signature.args[3])(context, builder, x_a).data, f32.as_pointer())
        n = builder.sext(n_v, i64) if n_v.type.width < 64 else n_v
        acc = cgutils.alloca_once_value(builder, ir.Constant(v8f, [0.0] * 8))
        with cgutils.for_range(builder, builder.udiv(n, ir.Constant(i64, 8))) as loop:
            k = builder.mul(loop.index, ir.Constant(i64, 8))
            wv = builder.load(builder.bitcast(builder.gep(wp, [k]), v8f.as_pointer()), align=1)
            xv = builder.load(builder.bitcast(builder.gep(xp, [k]), v8f.as_pointer()), align=4)
            builder.store(builder.fadd(builder.load(acc), builder.fmul(wv, xv)), acc)
        out = cgutils.alloca_once_value(builder, _hsum8(builder, builder.load(acc)))
        with cgutils.for_range_slice(builder, builder.mul(builder.udiv(n, ir.Constant(i64, 8)), ir.Constant(i64, 8)), n,
                                     ir.Constant(i64, 1)) as (i, _):
            wv = builder.load(builder.gep(wp, [i]), align=1)
            builder.store(builder.fadd(builder.load(out), builder.fmul(wv, builder.load(builder.gep(xp, [i])))), out)
        return builder.load(out)

    return sig, codegen


def _q4_0r_group_sums(builder, dp, gps, b0, xps, xsps, levels=None):
    """The exact int32 dots of a whole repacked Q4_0 group (blocks b0 .. b0 + 7) of each row at gps with each
    token's activations: sums[row][token] <8 x i32>, lane k the dot of block b0 + k.
    The group's 128 quant bytes are 4 chunks of 32 (quant.repack_q4_0): chunk j's byte 4k + m holds block k's
    weights 8j + m (low nibble) and 8j + 4 + m (high nibble), and the activations come transposed to match
    (quant.quantize_acts' xt: vector i's lane k = block k's values 4i .. 4i + 3). So each vpdpbusd adds 4
    products of every block to that block's own lane: 8 of them make the 8 block dots, with no horizontal
    reduction. The high nibbles are used in place (and 0xF0: 16 times their value, exact in int32) and their
    sums shifted back once; the offset terms xs (-8 times each block's activation sum) seed a chain.
    From L1, 1.8x faster than lanes per block reduced by shuffles; bit-identical sums.
    On the generic route (dp: ir._dpbusd_generic) the high nibbles are shifted down instead (pmaddubsw's int16 pair
    sums would saturate on 16 times them) and the 8 products of a row summed as ir._dots sums them: the same int32
    sums. levels (IQ4_NL in this layout): levels(builder, nibbles, dp) gives the weights the nibbles stand for as dp
    multiplies them (iquants._level_lanes), summed by ir._dots with no -8 offset (16 xs seeds the +128 of vpdpbusd's
    unsigned form, nothing on AVX2's signed dot)."""
    G = Q4_0R_GROUP
    v8i, i64 = ir.VectorType(_i32, 8), ir.IntType(64)
    zero, four = ir.Constant(v8i, [0] * 8), ir.Constant(v8i, [4] * 8)
    generic = _generic(dp) or levels is not None
    nibs = []  # [row][chunk] (low, 16 x high; generic: high) as <8 x i32>
    for gp in gps:
        chunks = [_vload(builder, builder.gep(gp, [ir.Constant(i64, 2 * G + 32 * j)]), 32) for j in range(4)]
        nibs.append([(builder.bitcast(builder.and_(v, _splat(32, 15)), v8i),
                      builder.bitcast(builder.lshr(v, _splat(32, 4)) if generic else builder.and_(v, _splat(32, -16)),
                                      v8i)) for v in chunks])
        if levels is not None:
            nibs[-1] = [(levels(builder, nl, dp), levels(builder, nh, dp)) for nl, nh in nibs[-1]]
    sums = [[None] * len(xps) for _ in gps]
    for t, (xp, xsp) in enumerate(zip(xps, xsps)):
        xg = builder.gep(xp, [builder.mul(b0, ir.Constant(i64, 32))])
        xv = [builder.load(builder.bitcast(builder.gep(xg, [ir.Constant(i64, 32 * i)]), v8i.as_pointer()), align=1)
              for i in range(8)]
        bias = builder.load(builder.bitcast(builder.gep(xsp, [b0]), v8i.as_pointer()), align=4)
        for r in range(len(gps)):
            if levels is not None:
                seed = None if _signed(dp) else builder.shl(bias, ir.Constant(v8i, [4] * 8))
                sums[r][t] = _dots(builder, dp, [t_ for j, (nl, nh) in enumerate(nibs[r])
                                                 for t_ in ((nl, xv[2 * j]), (nh, xv[2 * j + 1]))], seed, qmax=255)
                continue
            if generic:
                sums[r][t] = _dots(builder, dp, [t_ for j, (nl, nh) in enumerate(nibs[r])
                                                 for t_ in ((nl, xv[2 * j]), (nh, xv[2 * j + 1]))], bias)
                continue
            lo, hi = [bias, zero], [zero, zero]  # two chains each: half the dependent vpdpbusd latency
            for j, (nl, nh) in enumerate(nibs[r]):
                lo[j % 2] = builder.call(dp, [lo[j % 2], nl, xv[2 * j]])
                hi[j % 2] = builder.call(dp, [hi[j % 2], nh, xv[2 * j + 1]])
            sums[r][t] = builder.add(builder.add(lo[0], lo[1]), builder.ashr(builder.add(hi[0], hi[1]), four))
    return sums


def _q4_0r_dots(builder, wps, nb, xps, xdps, xsps, dp, gstride=18 * Q4_0R_GROUP, tail_at=None, each_group=None,
                levels=None):
    """Dots of the repacked Q4_0 rows at wps (byte pointers) with the activations of tokens xps (xt) / xdps /
    xsps (xs), quant.quantize_acts' forms for these dots: dots[row][token]. Each block's nibbles are unpacked
    once for all tokens and each token's activations loaded once for all rows. Per (row, token): whole groups
    add their 8 block dots times the 8 scales in one FMA (_q4_0r_group_sums), the tail blocks theirs by block
    parity, and one horizontal sum ends it, so a result
    depends on neither the rows nor the tokens beside it (batch tiles equal one token at a time; a paired
    gate/up dot equals each row's own). A row's groups lie gstride bytes apart (its own groups back to back,
    or two rows' groups interleaved); tail_at(groups, m) gives the pointers of the rows' last, shorter groups
    (default: where the next group would start). each_group(g) emits extra code at the start of whole group g
    (dot_gate_up_q4_0r_vnni's prefetches). levels: IQ4_NL's lookup (_q4_0r_group_sums)."""
    G = Q4_0R_GROUP
    v8f, v8i, i64 = ir.VectorType(ir.FloatType(), 8), ir.VectorType(_i32, 8), ir.IntType(64)
    nb = builder.sext(nb, i64) if nb.type.width < 64 else nb
    c = lambda v: ir.Constant(i64, v)
    accs = [[[cgutils.alloca_once_value(builder, ir.Constant(v8f, [0.0] * 8)) for _ in range(2)] for _ in xps]
            for _ in wps]  # [row][token][parity]
    scales8 = lambda p: builder.fpext(builder.load(builder.bitcast(p, ir.VectorType(ir.HalfType(), G).as_pointer()),
                                                   align=1), v8f)

    groups = builder.udiv(nb, c(G))
    with cgutils.for_range(builder, groups) as loop:  # whole groups: 8 scales in one load
        b0 = builder.mul(loop.index, c(G))
        if each_group is not None:
            each_group(loop.index)
        xd8s = [builder.load(builder.bitcast(builder.gep(xdp, [b0]), v8f.as_pointer()), align=4) for xdp in xdps]
        gps = [builder.gep(wp, [builder.mul(loop.index, c(gstride))]) for wp in wps]
        for gp, row_sums, row_accs in zip(gps, _q4_0r_group_sums(builder, dp, gps, b0, xps, xsps, levels), accs):
            w8 = scales8(gp)
            for sums, xd8, a in zip(row_sums, xd8s, row_accs):
                builder.store(_fma(builder, builder.sitofp(sums, v8f), builder.fmul(w8, xd8), builder.load(a[0])), a[0])
    b0 = builder.mul(groups, c(G))  # the tail group, m < 8 blocks: m scales, then 16 m quant bytes
    m = builder.sub(nb, b0)
    tps = tail_at(groups, m) if tail_at else [builder.gep(wp, [builder.mul(groups, c(gstride))]) for wp in wps]
    with cgutils.for_range(builder, m) as loop:
        b = builder.add(b0, loop.index)
        odd = builder.trunc(loop.index, ir.IntType(1))  # block parity picks the accumulator, as in the GGUF-layout dot
        # tail blocks keep Q4_0's byte order (xt there is x8 as it is); the block's offset term seeds lane 0
        shift = 4 if levels is not None else 0  # (IQ4_NL: vpdpbusd's + 128 taken out by 16 xs, or nothing to take)
        xs = [(builder.load(builder.bitcast(builder.gep(xp, [builder.mul(b, c(32))]), v8i.as_pointer()), align=1),
               ir.Constant(v8i, [0] * 8) if levels is not None and _signed(dp) else
               builder.insert_element(ir.Constant(v8i, [0] * 8), builder.shl(builder.load(builder.gep(xsp, [b]), align=4),
                                                                             ir.Constant(_i32, shift)),
                                      ir.Constant(_i32, 0)),
               _splat_f(builder, builder.load(builder.gep(xdp, [b]), align=4))) for xp, xdp, xsp in zip(xps, xdps, xsps)]
        for tp, row_accs in zip(tps, accs):
            nib = builder.bitcast(_nibbles32(builder, builder.gep(tp, [builder.add(builder.mul(m, c(2)),
                                                                                   builder.mul(loop.index, c(16)))])), v8i)
            if levels is not None:
                nib = levels(builder, nib, dp)
            ws = _half_splat(builder, builder.gep(tp, [builder.mul(loop.index, c(2))]))
            for (xv, xb, xds), a in zip(xs, row_accs):
                acc = builder.select(odd, a[1], a[0])
                lanes = builder.call(dp, [xb, nib, xv])
                if levels is not None:  # the block's exact sum in lane 0, so both of IQ4's forms round alike
                    total = builder.call(cgutils.get_or_insert_function(
                        builder.module, ir.FunctionType(_i32, [v8i]), "llvm.vector.reduce.add.v8i32"), [lanes])
                    lanes = builder.insert_element(ir.Constant(v8i, [0] * 8), total, ir.Constant(_i32, 0))
                builder.store(_fma(builder, builder.sitofp(lanes, v8f), builder.fmul(ws, xds), builder.load(acc)), acc)
    return [[_hsum8(builder, builder.fadd(builder.load(a[0]), builder.load(a[1]))) for a in row_accs]
            for row_accs in accs]


def _q4_0r_token_dots(builder, wp, nb, xps, xdps, xbps, dp):
    """One repacked Q4_0 row dotted with several tokens' activations (the token_dots form): _q4_0r_dots."""
    return _q4_0r_dots(builder, [wp], nb, xps, xdps, xbps, dp)[0]


def offset128_token_dots(block_bytes, unsigned_quants):
    """The token_dots of a 32-value block type whose block is an fp16 scale then quants standing for signed 8-bit
    values w (Q8_0: the int8 themselves; IQ4_NL: nibbles indexing its levels): unsigned_quants(builder, bp, dp) gives
    the block's <32 x i8> w + 128 (for Q8_0 its sign bit flipped, one vpxor per block for all tokens), as vpdpbusd
    multiplies unsigned by signed bytes, and each lane starts from 16 xb = -128 times its 4 activations' sum, which
    takes the offset back out: exact int32 lane sums (with ir._dpbssd_avx2, w itself and no offset: the same sums). Per token two float accumulators by block parity and one
    horizontal sum, as the Q4_0 dots, so the one-token and the several-token forms give identical results."""
    return lambda builder, wp, nb, xps, xdps, xbps, dp: _offset128_dots(builder, wp, nb, xps, xdps, xbps, dp,
                                                                        block_bytes, unsigned_quants)


def _offset128_dots(builder, wp, nb, xps, xdps, xbps, dp, block_bytes, unsigned_quants):
    v8f, v8i, i64 = ir.VectorType(ir.FloatType(), 8), ir.VectorType(_i32, 8), ir.IntType(64)
    nb = builder.sext(nb, i64) if nb.type.width < 64 else nb
    c = lambda v: ir.Constant(i64, v)
    accs = [[cgutils.alloca_once_value(builder, ir.Constant(v8f, [0.0] * 8)) for _ in range(2)] for _ in xps]

    signed = _signed(dp)  # (AVX2's dot of signed bytes: the weights as they are, no offset)

    def block(b, acc_of):
        bp = builder.gep(wp, [builder.mul(b, c(block_bytes))])
        q = unsigned_quants(builder, bp, dp)
        q = builder.bitcast(builder.xor(q, _splat(32, -128)) if signed else q, v8i)
        ws = _half_splat(builder, bp)
        for xp, xdp, xbp, acc in zip(xps, xdps, xbps, accs):
            xv = builder.load(builder.bitcast(builder.gep(xp, [builder.mul(b, c(32))]), v8i.as_pointer()), align=1)
            init = ir.Constant(v8i, [0] * 8) if signed else \
                builder.shl(builder.load(builder.gep(xbp, [b]), align=4), _splat(8, 4, _i32))
            lanes = builder.call(dp, [init, q, xv])
            scale = builder.fmul(ws, _splat_f(builder, builder.load(builder.gep(xdp, [b]), align=4)))
            a = acc_of(acc)
            builder.store(_fma(builder, builder.sitofp(lanes, v8f), scale, builder.load(a)), a)

    pairs = builder.udiv(nb, c(2))
    with cgutils.for_range(builder, pairs) as loop:  # two accumulators: the FMA chains interleave
        block(builder.mul(loop.index, c(2)), lambda a: a[0])
        block(builder.add(builder.mul(loop.index, c(2)), c(1)), lambda a: a[1])
    with cgutils.for_range_slice(builder, builder.mul(pairs, c(2)), nb, c(1)) as (b, _):
        block(b, lambda a: a[0])
    return [_hsum8(builder, builder.fadd(builder.load(a[0]), builder.load(a[1]))) for a in accs]


# Q8_0: fp16 scale, 32 int8
_q8_0_token_dots = offset128_token_dots(34, lambda builder, bp, dp: builder.xor(
    _vload(builder, builder.gep(bp, [ir.Constant(ir.IntType(64), 2)]), 32), _splat(32, -128)))


def _fifth_bits(builder, p):
    """<32 x i8>: 16 where bit l of the little-endian 32 bits at p is set, else 0 (Q5_0 / Q5_1's qh). Bytewise: the
    4 bytes spread over the 32 lanes by a constant shuffle, each lane's bit tested with a constant mask: a handful
    of byte ops, where shifting a 32-lane i32 vector and narrowing it back took four times as many."""
    v4 = builder.bitcast(builder.load(builder.bitcast(p, _i32.as_pointer()), align=1), ir.VectorType(_i8, 4))
    spread = builder.shuffle_vector(v4, v4, ir.Constant(ir.VectorType(_i32, 32), [l // 8 for l in range(32)]))
    bits = ir.Constant(ir.VectorType(_i8, 32), [1 << (l % 8) if l % 8 < 7 else -128 for l in range(32)])
    hit = builder.icmp_unsigned("!=", builder.and_(spread, bits), _splat(32, 0))
    return builder.select(hit, _splat(32, 16), _splat(32, 0))


def _q5_0_token_dots(builder, wp, nb, xps, xdps, xbps, dp):
    """A Q5_0 row (blocks of 22 bytes: fp16 scale, qh with the 32 fifth bits, 16 nibble bytes; value = q - 16)
    dotted through vpdpbusd with one or more tokens' int8 activations, as _q8_0_token_dots: the 32 unsigned 5-bit
    values assembled once per block for all tokens (nibbles split, fifth bits moved in from qh), each lane starting
    from 2 xb = -16 times its 4 activations' sum, which takes the offset out: exact int32 sums. The floats round as
    llama.cpp's (vec_dot_q5_0_q8_0 and its tinyBLAS batch kernel): one FMA chain over the blocks, ggml's lane sum.
    Q5_0 rows are the q/k/gate/up of small models whose output a real model amplifies (Gemma 3 270M), so the order
    is worth its single chain."""
    v8f, v8i, i64 = ir.VectorType(ir.FloatType(), 8), ir.VectorType(_i32, 8), ir.IntType(64)
    nb = builder.sext(nb, i64) if nb.type.width < 64 else nb
    c = lambda v: ir.Constant(i64, v)
    accs = [cgutils.alloca_once_value(builder, ir.Constant(v8f, [0.0] * 8)) for _ in xps]
    with cgutils.for_range(builder, nb) as loop:
        b = loop.index
        bp = builder.gep(wp, [builder.mul(b, c(22))])
        qs = _vload(builder, builder.gep(bp, [c(6)]), 16)
        lo, hi = builder.and_(qs, _splat(16, 15)), builder.lshr(qs, _splat(16, 4))
        nib = builder.shuffle_vector(lo, hi, ir.Constant(ir.VectorType(_i32, 32), list(range(32))))  # values 0..31
        q = builder.bitcast(builder.or_(nib, _fifth_bits(builder, builder.gep(bp, [c(2)]))), v8i)
        ws = _half_splat(builder, bp)
        for xp, xdp, xbp, a in zip(xps, xdps, xbps, accs):
            xv = builder.load(builder.bitcast(builder.gep(xp, [builder.mul(b, c(32))]), v8i.as_pointer()), align=1)
            init = builder.shl(builder.load(builder.gep(xbp, [b]), align=4), _splat(8, 1, _i32))
            lanes = builder.call(dp, [init, q, xv])
            scale = builder.fmul(ws, _splat_f(builder, builder.load(builder.gep(xdp, [b]), align=4)))
            builder.store(_fma(builder, scale, builder.sitofp(lanes, v8f), builder.load(a)), a)
    return [_hsum8_ggml(builder, builder.load(a)) for a in accs]


dot_row_q8_0_vnni = _row_intrinsic(_q8_0_token_dots, """A Q8_0 row's dot with one token's int8 activations through
    vpdpbusd (_q8_0_token_dots; x86 AVX512-VNNI only, as dot_row_q4_0_vnni): one xor and one vpdpbusd per block
    where the generic dot widens to int16 and runs two vpmaddwd.""")
# Q8_0 on CPUs without VNNI but with AVX2: the same frame through pmaddubsw on signed bytes (ir._dpbssd_avx2), with
# batch tiles; elsewhere dot_row_q8_0's int16 dot
_, _, dot_row_q8_0_generic, dot_tokens_q8_0_generic = _routes(_q8_0_token_dots, "Q8_0", signed=True)
dot_row_q5_0_vnni = _row_intrinsic(_q5_0_token_dots, """A Q5_0 row's dot with one token's int8 activations through
    vpdpbusd (_q5_0_token_dots; x86 AVX512-VNNI only).""")


def _q4_0_token_dots(builder, wp, nb, xps, xdps, xbps, dp):
    """A Q4_0 row dotted with one or more tokens' int8 activations through dp (the token_dots form): each block's 32
    nibbles (0..15) split once for all tokens, each lane starting from xb = -8 times its 4 activations' sum, which
    takes the offset out; per token two float accumulators by block parity and one horizontal sum."""
    v8f, v8i, i64 = ir.VectorType(ir.FloatType(), 8), ir.VectorType(_i32, 8), ir.IntType(64)
    nb = builder.sext(nb, i64) if nb.type.width < 64 else nb
    c = lambda v: ir.Constant(i64, v)  # noqa: E731
    accs = [[cgutils.alloca_once_value(builder, ir.Constant(v8f, [0.0] * 8)) for _ in range(2)] for _ in xps]

    def block(b, k):
        pb = builder.gep(wp, [builder.mul(b, c(18))])
        q = builder.bitcast(_nibbles32(builder, builder.gep(pb, [c(2)])), v8i)
        ws = _half_splat(builder, pb)
        for xp, xdp, xbp, acc in zip(xps, xdps, xbps, accs):
            xv = builder.load(builder.bitcast(builder.gep(xp, [builder.mul(b, c(32))]), v8i.as_pointer()), align=1)
            lanes = builder.call(dp, [builder.load(builder.gep(xbp, [b]), align=4), q, xv])
            scale = builder.fmul(ws, _splat_f(builder, builder.load(builder.gep(xdp, [b]), align=4)))
            builder.store(_fma(builder, builder.sitofp(lanes, v8f), scale, builder.load(acc[k])), acc[k])

    pairs = builder.udiv(nb, c(2))
    with cgutils.for_range(builder, pairs) as loop:  # two accumulators: the FMA chains interleave
        block(builder.mul(loop.index, c(2)), 0)
        block(builder.add(builder.mul(loop.index, c(2)), c(1)), 1)
    with cgutils.for_range_slice(builder, builder.mul(pairs, c(2)), nb, c(1)) as (b, _):
        block(b, 0)
    return [_hsum8(builder, builder.fadd(builder.load(a[0]), builder.load(a[1]))) for a in accs]


# Q4_0: vpdpbusd multiplies a block's 32 unsigned nibbles (0..15, no -8 offset) by 32 int8 activations in one
# instruction, accumulating onto xb (-8 times each lane's 4 activations: quant.quantize_acts), which takes the offset
# out. In one process against a form with a per-block scalar bias term: 23% faster from cache, 6% on a TinyLlama-sized
# matvec from DRAM; that form was 12% faster than the generic vpmaddwd one. dot_row_q4_0_vnni serves the neuron packs
# and the GGUF-layout matmul on VNNI CPUs (callers check quant.HAS_VNNI first); the dense path repacks Q4_0 there.
# Q4_0 and Q5_0 on CPUs without VNNI: the same code with vpdpbusd's sums from pmaddubsw (ir._dpbusd_small).
dot_row_q4_0_vnni, _, dot_row_q4_0_generic, dot_tokens_q4_0_generic = _routes(_q4_0_token_dots, "Q4_0", small=True)
_, _, dot_row_q5_0_generic, dot_tokens_q5_0_generic = _routes(_q5_0_token_dots, "Q5_0", small=True)


# Repacked Q4_0 on every route: vpdpbusd on VNNI CPUs, the same int32 sums in generic IR elsewhere
# (_q4_0r_group_sums: pmaddubsw's int16 pair sums on AVX2)
dot_row_q4_0r_vnni, dot_tokens_q4_0r_vnni, dot_row_q4_0r_generic, dot_tokens_q4_0r_generic = _routes(
    _q4_0r_token_dots, "Q4_0R", per_block=1)
dot_row_q4_0r_vnni.__doc__ = """dot_row_q4_0_vnni for a row in the repacked Q4_0 layout (quant.repack_q4_0: per group of 8 blocks, their 8
    fp16 scales, then their quants with the group's blocks across the lanes; a shorter group at the row's end),
    with the activations in the forms it reads (quant.quantize_acts: xt, xs; xd as for every int8 dot). The 8
    scales convert in one vcvtph2ps and multiply the activations' 8 block scales in one vmulps, and meet the
    group's 8 exact block dots (_q4_0r_group_sums) in one FMA. Against the GGUF-layout dot: the per-block scale
    load, conversion and multiply gone (a TinyLlama-sized matvec 11% faster from DRAM), then no horizontal
    reduction per block (1.8x faster from L1). The sum differs from the GGUF-layout dot's by float rounding only."""
dot_tokens_q4_0r_vnni.__doc__ = """dot_row_q4_0r_vnni of one row with TOKENS tokens'
    activations (_tokens_intrinsic; xt, xd, xs as it reads them): the row's nibbles are split and its scales
    converted once for all of them (a prompt batch's matmul, quant.matmul_q4_0r_vnni); each result is
    bit-identical to the one-token dot."""


dot_tokens_q5_0_vnni = _tokens_intrinsic(_q5_0_token_dots, """dot_row_q5_0_vnni of one row with TOKENS tokens'
    activations (_tokens_intrinsic): each block's values assembled once for all of them; each result identical to
    the one-token dot.""")
dot_tokens_q8_0_vnni = _tokens_intrinsic(_q8_0_token_dots, """dot_row_q8_0_vnni of one row with TOKENS tokens'
    activations (_tokens_intrinsic): each block's bytes flipped and its scale converted once for all of them;
    each result identical to the one-token dot.""")


def _q41_51_token_dots(five):
    """Q4_1 (blocks of 20 bytes: fp16 d, fp16 m, 16 nibble bytes in Q4_0's order; value = d q + m) or Q5_1 (24 bytes:
    d, m, qh with the 32 fifth bits, then the nibbles) dotted through vpdpbusd with one or more tokens' int8
    activations (the token_dots form): the 32 unsigned values assembled once per block for all tokens, exact int32
    sums times d and the block's activation scale; the min's term m x the activations' sum from xb (-8 x each 4
    values' sum), in its own accumulator."""
    size, qs_at = (24, 8) if five else (20, 4)

    def token_dots(builder, wp, nb, xps, xdps, xbps, dp):
        v8f, v8i, i64 = ir.VectorType(ir.FloatType(), 8), ir.VectorType(_i32, 8), ir.IntType(64)
        v32i32 = ir.VectorType(_i32, 32)
        nb = builder.sext(nb, i64) if nb.type.width < 64 else nb
        c = lambda v: ir.Constant(i64, v)  # noqa: E731
        accs = [[cgutils.alloca_once_value(builder, ir.Constant(v8f, [0.0] * 8)) for _ in range(2)] for _ in xps]
        zero = ir.Constant(v8i, [0] * 8)
        with cgutils.for_range(builder, nb) as loop:
            b = loop.index
            bp = builder.gep(wp, [builder.mul(b, c(size))])
            qs = _vload(builder, builder.gep(bp, [c(qs_at)]), 16)
            lo, hi = builder.and_(qs, _splat(16, 15)), builder.lshr(qs, _splat(16, 4))
            q = builder.shuffle_vector(lo, hi, ir.Constant(v32i32, list(range(32))))  # values 0..31
            if five:
                q = builder.or_(q, _fifth_bits(builder, builder.gep(bp, [c(4)])))
            q = builder.bitcast(q, v8i)
            ws, ms = _half_splat(builder, bp), _half_splat(builder, builder.gep(bp, [c(2)]))
            for xp, xdp, xbp, (a, am) in zip(xps, xdps, xbps, accs):
                xv = builder.load(builder.bitcast(builder.gep(xp, [builder.mul(b, c(32))]), v8i.as_pointer()), align=1)
                lanes = builder.call(dp, [zero, q, xv])
                xd = _splat_f(builder, builder.load(builder.gep(xdp, [b]), align=4))
                builder.store(_fma(builder, builder.fmul(ws, xd), builder.sitofp(lanes, v8f), builder.load(a)), a)
                xbv = builder.load(builder.gep(xbp, [b]), align=4)
                builder.store(_fma(builder, builder.fmul(ms, xd), builder.sitofp(xbv, v8f), builder.load(am)), am)
        eighth = ir.Constant(ir.FloatType(), -0.125)  # xb holds -8 x the sums
        return [builder.fadd(_hsum8(builder, builder.load(a)), builder.fmul(_hsum8(builder, builder.load(am)), eighth))
                for a, am in accs]

    return token_dots


# Q4_1 and Q5_1: the VNNI frames, and their twins in generic vector IR for every other CPU (identical sums)
dot_row_q4_1_vnni, dot_tokens_q4_1_vnni, dot_row_q4_1_generic, dot_tokens_q4_1_generic = _routes(
    _q41_51_token_dots(False), "Q4_1")
dot_row_q5_1_vnni, dot_tokens_q5_1_vnni, dot_row_q5_1_generic, dot_tokens_q5_1_generic = _routes(
    _q41_51_token_dots(True), "Q5_1")


TILE_ROWS = 8  # rows of a Q4_0 tile (kernels/head.tile_q4_0): one row per lane of the sums


def _lane_pairs(builder, a, b):
    """Two integer vectors of n lanes -> the sums of adjacent lanes, a's n / 2 then b's."""
    n = a.type.count
    idx = lambda k: ir.Constant(ir.VectorType(_i32, n), list(range(k, 2 * n, 2)))  # noqa: E731
    return builder.add(builder.shuffle_vector(a, b, idx(0)), builder.shuffle_vector(a, b, idx(1)))


def _tile_q4_0(vnni):
    """The codegen of dot_tile_q4_0_vnni / _generic: a tile's 8 rows dotted with one token, 8 floats stored at
    out[ooff:]. Per block, three rounds of adjacent-lane sums turn the 8 rows' product sums into one vector of the 8
    rows' block sums (row k in lane k), offset by the block's -8 x (sum of activations) and scaled by the 8 rows'
    scales at once. On AVX2 the rounds run on pmaddubsw's int16 pairs (a lane then sums 16 products, within
    16 x 15 x 127 = 30480) and one pmaddwd ends them; with VNNI, and on other CPUs, on vpdpbusd's int32 lanes."""
    def codegen(context, builder, signature, args):
        w, woff, nb, x8, xd, bias, out, ooff = args
        f32, v8f, v8i = ir.FloatType(), ir.VectorType(ir.FloatType(), 8), ir.VectorType(_i32, 8)
        zero = ir.Constant(woff.type, 0)
        wp = _ptr(context, builder, signature.args[0], w, woff)
        xp = _ptr(context, builder, signature.args[3], x8, zero)
        xdp = builder.bitcast(_ptr(context, builder, signature.args[4], xd, zero), f32.as_pointer())
        bp = builder.bitcast(_ptr(context, builder, signature.args[5], bias, zero), _i32.as_pointer())
        op = builder.bitcast(_ptr(context, builder, signature.args[6], out, builder.mul(ooff, ir.Constant(ooff.type, 4))),
                             v8f.as_pointer())
        acc = cgutils.alloca_once_value(builder, ir.Constant(v8f, [0.0] * 8))
        with cgutils.for_range(builder, nb) as loop:
            b = loop.index
            tb = builder.gep(wp, [builder.mul(b, ir.Constant(b.type, 18 * TILE_ROWS))])
            halves = builder.load(builder.bitcast(tb, ir.VectorType(ir.HalfType(), 8).as_pointer()), align=1)
            scale = builder.fmul(builder.fpext(halves, v8f), _splat_f(builder, builder.load(builder.gep(xdp, [b]), align=4)))
            xv = _vload(builder, builder.gep(xp, [builder.mul(b, ir.Constant(b.type, 32))]), 32)
            nib = [_nibbles32(builder, builder.gep(tb, [ir.Constant(_i32, 16 + 16 * k)])) for k in range(TILE_ROWS)]
            if X86_AVX2 and not vnni:
                s = [_pmaddubsw(builder, q, xv) for q in nib]
            else:
                dp = _vpdpbusd(builder) if vnni else _dpbusd_generic(builder)
                s = [builder.call(dp, [ir.Constant(v8i, [0] * 8), builder.bitcast(q, v8i), builder.bitcast(xv, v8i)])
                     for q in nib]
            while len(s) > 1:
                s = [_lane_pairs(builder, s[i], s[i + 1]) for i in range(0, len(s), 2)]
            sums = _pmaddwd_ones(builder, s[0]) if X86_AVX2 and not vnni else s[0]
            sums = builder.add(sums, _splat_f(builder, builder.load(builder.gep(bp, [b]), align=4)))
            builder.store(_fma(builder, builder.sitofp(sums, v8f), scale, builder.load(acc)), acc)
        builder.store(builder.load(acc), op, align=4)
        return context.get_dummy_value()

    return codegen


def _tile_intrinsic(vnni, doc):
    @intrinsic
    def dot_tile(typingctx, w, woff, nb, x8, xd, bias, out, ooff):
        sig = types.void(w, woff, nb, x8, xd, bias, out, ooff)
        return sig, _vnni_or_trap(_tile_q4_0(True)) if vnni else _tile_q4_0(False)

    dot_tile.__doc__ = doc
    return dot_tile


dot_tile_q4_0_vnni = _tile_intrinsic(True, """out[ooff + k] = row k of the Q4_0 tile at w[woff:] (nb blocks; kernels/head.tile_q4_0)
dotted with one token's int8 activations x8 (block scales xd, and bias: per block -8 times the sum of its
activations, int32), k < 8, through vpdpbusd (x86 AVX512-VNNI only).""")
dot_tile_q4_0_generic = _tile_intrinsic(False, "dot_tile_q4_0_vnni on every CPU (pmaddubsw on AVX2): the same sums.")
