"""The frame every intrinsic of this package is built on: pointers, vector loads and splats, fp16 / bf16 loads,
horizontal sums, prefetch, and the two VNNI intrinsic frames (one token: _row_intrinsic; TOKENS tokens:
_tokens_intrinsic) that each weight type's token_dots plugs into.

The intrinsics emit generic LLVM vector IR (so they also build for ARM), except the x86 ones that call
AVX512-VNNI's vpdpbusd: kernels compile those into a branch taken only when HAS_X86_VNNI; on any other CPU their
body is a trap (_vnni_or_trap), so the kernels still compile there and the branch is never taken.

All pointers are (array, byte offset) pairs: callers validate offsets before any kernel runs
(see sparserun.gguf_file), so these do no bounds checks of their own.
"""
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

_i8, _i16, _i32 = ir.IntType(8), ir.IntType(16), ir.IntType(32)


def _has_x86_vnni():
    """AVX512-VNNI (with VL for 256-bit forms) on this CPU, unless SPARSERUN_NO_VNNI=1 (A/B runs, or a fallback)."""
    import os

    import llvmlite.binding as llvm

    if os.environ.get("SPARSERUN_NO_VNNI") == "1":
        return False
    try:
        f = llvm.get_host_cpu_features()
        return bool(f.get("avx512vnni") and f.get("avx512vl"))
    except Exception:
        return False


HAS_X86_VNNI = _has_x86_vnni()
Q4_0R_GROUP = 8  # blocks per group of the repacked Q4_0 row layout (quant.repack_q4_0)


def _vnni_or_trap(codegen):
    """codegen where HAS_X86_VNNI, else a body that traps (callers only reach it when HAS_X86_VNNI)."""
    if HAS_X86_VNNI:
        return codegen

    def trap(context, builder, signature, args):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), []), "llvm.trap")
        builder.call(fn, [])
        return context.get_constant_null(signature.return_type) if signature.return_type != types.void \
            else context.get_dummy_value()

    return trap


def _ptr(context, builder, arrty, arr, off):
    data = context.make_array(arrty)(context, builder, arr).data
    return builder.gep(builder.bitcast(data, _i8.as_pointer()), [off])


def _vload(builder, ptr, n):
    vty = ir.VectorType(_i8, n)
    return builder.load(builder.bitcast(ptr, vty.as_pointer()), align=1)


def _splat(n, value, ty=_i8):
    return ir.Constant(ir.VectorType(ty, n), [value] * n)


@intrinsic
def load_f16(typingctx, arr, off):
    """float32 value of the IEEE half stored at arr's byte offset `off`."""
    sig = types.float32(arr, off)

    def codegen(context, builder, signature, args):
        p = _ptr(context, builder, signature.args[0], args[0], args[1])
        h = builder.load(builder.bitcast(p, ir.HalfType().as_pointer()), align=1)
        return builder.fpext(h, ir.FloatType())

    return sig, codegen


@intrinsic
def load_bf16(typingctx, arr, off):
    """float32 value of the bfloat16 stored at arr's byte offset `off` (its upper 16 bits)."""
    sig = types.float32(arr, off)

    def codegen(context, builder, signature, args):
        p = _ptr(context, builder, signature.args[0], args[0], args[1])
        h = builder.load(builder.bitcast(p, _i16.as_pointer()), align=1)
        bits = builder.shl(builder.zext(h, _i32), ir.Constant(_i32, 16))
        return builder.bitcast(bits, ir.FloatType())

    return sig, codegen


@intrinsic
def f32_from_bits(typingctx, bits):
    """The float32 whose bit pattern is the int32 `bits` (builds 2**n for ops.fast_exp; vectorizes)."""
    sig = types.float32(types.int32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


@intrinsic
def f32_bits(typingctx, value):
    """The int32 bit pattern of float32 `value`: magnitudes compare as integers, a max that vectorizes where a float
    max reduction did not (quant.quantize_acts_k)."""
    sig = types.int32(types.float32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], _i32)

    return sig, codegen


@intrinsic
def round_f16(typingctx, value):
    """value rounded to the nearest IEEE half, as float32 (llama.cpp stores block scales as fp16)."""
    sig = types.float32(types.float32)

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.fptrunc(args[0], ir.HalfType()), ir.FloatType())

    return sig, codegen


@intrinsic
def half_bits(typingctx, value):
    """The IEEE half nearest to float32 value (round to nearest even, as numpy's astype(float16)), as its uint16
    bits."""
    sig = types.uint16(types.float32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), _i16)

    return sig, codegen


@intrinsic
def load_f32(typingctx, arr, off):
    """float32 value stored at arr's byte offset `off` (no alignment assumed)."""
    sig = types.float32(arr, off)

    def codegen(context, builder, signature, args):
        p = _ptr(context, builder, signature.args[0], args[0], args[1])
        return builder.load(builder.bitcast(p, ir.FloatType().as_pointer()), align=1)

    return sig, codegen


def _even_odd_add(builder, v):
    """Sum adjacent lane pairs of an int32 vector: <2n x i32> -> <n x i32> (LLVM matches this plus the
    widening multiply to pmaddwd)."""
    n = v.type.count // 2
    ev = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_i32, n), list(range(0, 2 * n, 2))))
    od = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_i32, n), list(range(1, 2 * n, 2))))
    return builder.add(ev, od)


def _half_splat(builder, p, n=8):
    """The fp16 at p as an <n x float> splat (vpbroadcastw from memory + vcvtph2ps). Every lane is used by
    the caller, so LLVM cannot narrow it to a scalar half load, which it lowers to vpinsrw into whatever
    register is free, often the loop's accumulator: that false dependency chained every block to the
    previous one (3x slower row dots in a fused kernel, 5% in the dense matmul; A/B in one process)."""
    h = builder.load(builder.bitcast(p, ir.HalfType().as_pointer()), align=1)
    return builder.fpext(_splat_f(builder, h, n), ir.VectorType(ir.FloatType(), n))


def _splat_f(builder, value, n=8):
    """A scalar (float, half or int) as an <n x same type> splat."""
    v = ir.VectorType(value.type, n)
    return builder.shuffle_vector(builder.insert_element(ir.Constant(v, ir.Undefined), value, ir.Constant(_i32, 0)),
                                  ir.Constant(v, ir.Undefined), ir.Constant(ir.VectorType(_i32, n), [0] * n))


def _hsum8(builder, v):
    """The sum of an <8 x float>'s lanes (once per row, after the block loop)."""
    s = builder.extract_element(v, ir.Constant(_i32, 0))
    for i in range(1, 8):
        s = builder.fadd(s, builder.extract_element(v, ir.Constant(_i32, i)))
    return s


def _hsum8_ggml(builder, v):
    """The sum of an <8 x float>'s lanes in ggml's order (hsum_float_8: the upper half added to the lower, then lanes
    2-3 to 0-1, then lane 1 to 0), for dots whose rounding should be llama.cpp's."""
    e = lambda i: builder.extract_element(v, ir.Constant(_i32, i))  # noqa: E731
    r = [builder.fadd(e(i + 4), e(i)) for i in range(4)]
    return builder.fadd(builder.fadd(r[0], r[2]), builder.fadd(r[1], r[3]))


def _prefetch_line(builder, p, locality=2):
    """llvm.prefetch of the cache line at byte pointer p into L2 (locality 2: more requests can be in flight
    than for L1, measured faster for row gathers; locality 1 measured alike, 3 and 0 1.4x slower in pack_ffn), or
    into L1 (locality 3) for bytes a kernel reads a few steps later."""
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [_i8.as_pointer(), _i32, _i32, _i32]),
                                        "llvm.prefetch.p0i8")
    builder.call(fn, [p, ir.Constant(_i32, 0), ir.Constant(_i32, locality), ir.Constant(_i32, 1)])


@intrinsic
def prefetch(typingctx, arr, off, nbytes):
    """Hint the cache to load arr's bytes [off, off+nbytes), one line per 64 bytes (_prefetch_line): a
    gathered row starts where the hardware prefetcher has no stream running."""
    sig = types.void(arr, off, nbytes)

    def codegen(context, builder, signature, args):
        p = _ptr(context, builder, signature.args[0], args[0], args[1])
        with cgutils.for_range_slice(builder, ir.Constant(args[2].type, 0), args[2], ir.Constant(args[2].type, 64)) as (i, _):
            _prefetch_line(builder, builder.gep(p, [i]))
        return context.get_dummy_value()

    return sig, codegen


def _fma(builder, a, b, c):
    """a * b + c on <n x float>, fused (one instruction, one rounding)."""
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(a.type, [a.type] * 3),
                                        f"llvm.fma.v{a.type.count}f32")
    return builder.call(fn, [a, b, c])


def _nibbles32(builder, qp):
    """The 32 nibbles of a Q4_0 block's 16 quant bytes at qp as <32 x i8> 0..15, low nibbles first: the bytes
    loaded into both 128-bit halves, the upper half shifted by 4 (vbroadcasti128, vpsrlvq, vpand: one
    instruction fewer than splitting and re-joining two halves)."""
    q = _vload(builder, qp, 16)
    both = builder.shuffle_vector(q, q, ir.Constant(ir.VectorType(_i32, 32), list(range(16)) * 2))
    i64x4 = ir.VectorType(ir.IntType(64), 4)
    both = builder.lshr(builder.bitcast(both, i64x4), ir.Constant(i64x4, [0, 0, 4, 4]))
    return builder.and_(builder.bitcast(both, ir.VectorType(_i8, 32)), _splat(32, 15))


def _has_x86_avx2():
    """AVX2 on this x86 CPU (read by the generic route's K-quant dots at code generation), unless
    SPARSERUN_PORTABLE_IR=1 (only portable IR: the aarch64 build check, or a fallback)."""
    import os

    import llvmlite.binding as llvm

    if os.environ.get("SPARSERUN_PORTABLE_IR") == "1":
        return False
    try:
        return bool(llvm.get_host_cpu_features().get("avx2"))
    except Exception:
        return False


X86_AVX2 = _has_x86_avx2()


def _pmaddubsw(builder, q, x):
    """llvm.x86.avx2.pmadd.ub.sw of q's unsigned and x's signed bytes (<8 x i32> each): adjacent products summed in
    int16, saturating, as <16 x i16>. LLVM does not form it from portable IR when it can prove (as the K-quant dots
    let it) that nothing saturates: it widens every byte to int16 instead, three times the instructions."""
    v32i8, v16i16 = ir.VectorType(_i8, 32), ir.VectorType(_i16, 16)
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v16i16, [v32i8, v32i8]),
                                        "llvm.x86.avx2.pmadd.ub.sw")
    return builder.call(fn, [builder.bitcast(q, v32i8), builder.bitcast(x, v32i8)])


def _pmaddwd_ones(builder, v):
    """llvm.x86.avx2.pmadd.wd of <16 x i16> v with ones: adjacent pairs summed in int32, <8 x i32>."""
    v16i16, v8i32 = ir.VectorType(_i16, 16), ir.VectorType(_i32, 8)
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v8i32, [v16i16, v16i16]),
                                        "llvm.x86.avx2.pmadd.wd")
    return builder.call(fn, [v, ir.Constant(v16i16, [1] * 16)])


def _vpdpbusd(builder):
    """llvm.x86.avx512.vpdpbusd.256: (acc <8 x i32>, unsigned bytes, signed bytes) -> acc + 4-byte dot per lane."""
    v8i = ir.VectorType(_i32, 8)
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(v8i, [v8i, v8i, v8i]),
                                          "llvm.x86.avx512.vpdpbusd.256")


def _inline_dp(builder, name, body):
    """The module's internal always-inline function `name` (acc, a, x: <8 x i32> each) -> <8 x i32>, its body
    body(b, acc, a, x) built once per module, so the frames call it as they call vpdpbusd."""
    fn = builder.module.globals.get(name)
    if fn is not None:
        return fn
    v8i = ir.VectorType(_i32, 8)
    fn = ir.Function(builder.module, ir.FunctionType(v8i, [v8i, v8i, v8i]), name)
    fn.linkage = "internal"
    fn.attributes.add("alwaysinline")
    b = ir.IRBuilder(fn.append_basic_block())
    b.ret(body(b, *fn.args))
    return fn


def _dpbusd_generic(builder):
    """vpdpbusd's arithmetic in generic vector IR, for CPUs without AVX512-VNNI (and ARM): acc + per lane the dot of
    4 unsigned bytes with 4 signed bytes. Products fit int16 (255 x 127), so the widen-multiply-pairwise-add below is
    the pattern LLVM lowers to vpmaddwd on x86 (a second pairwise add makes the 4-byte groups); wrap-around exactly
    as vpdpbusd."""
    def body(b, acc, a, x):
        v32i8, v32i16, v32i32 = ir.VectorType(_i8, 32), ir.VectorType(_i16, 32), ir.VectorType(_i32, 32)
        a16 = b.zext(b.bitcast(a, v32i8), v32i16)
        x16 = b.sext(b.bitcast(x, v32i8), v32i16)
        pairs = _even_odd_add(b, b.mul(b.sext(a16, v32i32), b.sext(x16, v32i32)))  # <16 x i32>
        return b.add(acc, _even_odd_add(b, pairs))  # <8 x i32>: 4-byte groups

    return _inline_dp(builder, "sparserun.dpbusd.generic", body)


def _dpbusd_small(builder):
    """vpdpbusd's arithmetic for weight bytes below 128 (Q4_0's nibbles, Q5_0's 5-bit values), on CPUs without
    AVX512-VNNI: on x86 with AVX2, pmaddubsw (pairs of products within int16: 2 x 127 x 127 = 32258) then pmaddwd by
    ones, as llama.cpp's AVX2 dots; elsewhere _dpbusd_generic. The same sums as vpdpbusd."""
    if not X86_AVX2:
        return _dpbusd_generic(builder)
    return _inline_dp(builder, "sparserun.dpbusd.small",
                      lambda b, acc, a, x: b.add(acc, _pmaddwd_ones(b, _pmaddubsw(b, a, x))))


def _dpbssd_avx2(builder):
    """acc + per lane the dot of 4 signed bytes a (-128..127) with 4 signed bytes x (within +-127), on x86 with AVX2:
    pmaddubsw(|a|, x with a's signs) (|a| unsigned: 128 for -128; a pair within int16, 2 x 128 x 127) then pmaddwd
    by ones, as llama.cpp's AVX2 dots of signed weights. The frames of the offset-128 types (Q8_0, IQ4_NL, IQ4_XS:
    weights + 128 for vpdpbusd, the offset taken out by the accumulator's start) take it on the generic route of AVX2
    CPUs with the weights as they are and no offset (_signed): vpdpbusd's arithmetic on weights up to 255 would need
    int32 products."""
    def body(b, acc, a, x):
        v32 = ir.VectorType(_i8, 32)
        a8, x8 = b.bitcast(a, v32), b.bitcast(x, v32)
        sign = cgutils.get_or_insert_function(b.module, ir.FunctionType(v32, [v32, v32]), "llvm.x86.avx2.psign.b")
        absb = cgutils.get_or_insert_function(b.module, ir.FunctionType(v32, [v32, ir.IntType(1)]), "llvm.abs.v32i8")
        mag = b.call(absb, [a8, ir.Constant(ir.IntType(1), 0)])
        return b.add(acc, _pmaddwd_ones(b, _pmaddubsw(b, mag, b.call(sign, [x8, a8]))))

    return _inline_dp(builder, "sparserun.dpbssd.avx2", body)


def _signed(dp):
    """Whether dp is _dpbssd_avx2: the offset-128 frames then pass their weights unshifted and no offset."""
    return dp.name == "sparserun.dpbssd.avx2"


def _route_dp(builder, generic, small, signed):
    """The dot a frame calls: vpdpbusd; on the generic route _dpbusd_small (small: weight bytes below 128),
    _dpbssd_avx2 (signed: an offset-128 type, on x86 with AVX2) or _dpbusd_generic."""
    if not generic:
        return _vpdpbusd(builder)
    if small:
        return _dpbusd_small(builder)
    return _dpbssd_avx2(builder) if signed and X86_AVX2 else _dpbusd_generic(builder)


def _generic(dp):
    return dp.name == "sparserun.dpbusd.generic"


def _dots(builder, dp, terms, seed=None, qmax=15):
    """seed (or 0) + the sum over terms (q, x: <8 x i32> of unsigned bytes <= qmax and of signed bytes) of
    vpdpbusd(0, q, x): lane k the sum of its 4-byte group's products over all terms. Through vpdpbusd in two chains
    (half the dependent latency). On the generic route (dp is ir._dpbusd_generic): on x86 with AVX2 as AVX2 CPUs do
    it, pmaddubsw's int16 pair sums added over as many terms as cannot overflow int16 (|pair| <= 2 x 128 qmax),
    then one pmaddwd by ones per such run (2 instructions per 32 bytes where widening took 6); elsewhere in
    portable IR, products widened and summed in pairs into one <16 x i32> (vpmaddwd's pattern, smull / addp on
    ARM), the pairs added once at the end. The same sums on every route."""
    zero = ir.Constant(ir.VectorType(_i32, 8), [0] * 8)
    if not _generic(dp):
        ch = [seed if seed is not None else zero, zero]
        for i, (q, x) in enumerate(terms):
            ch[i % 2] = builder.call(dp, [ch[i % 2], q, x])
        return builder.add(ch[0], ch[1])
    out = seed
    if X86_AVX2:
        run = max(1, 32767 // (2 * 128 * qmax))
        for at in range(0, len(terms), run):
            acc = None
            for q, x in terms[at:at + run]:
                p = _pmaddubsw(builder, q, x)
                acc = p if acc is None else builder.add(acc, p)
            s = _pmaddwd_ones(builder, acc)
            out = s if out is None else builder.add(out, s)
        return out
    v32i8, v32i16, v32i32 = ir.VectorType(ir.IntType(8), 32), ir.VectorType(ir.IntType(16), 32), ir.VectorType(_i32, 32)
    acc = None
    for q, x in terms:
        a = builder.sext(builder.zext(builder.bitcast(q, v32i8), v32i16), v32i32)
        b = builder.sext(builder.sext(builder.bitcast(x, v32i8), v32i16), v32i32)
        pairs = _even_odd_add(builder, builder.mul(a, b))  # <16 x i32>
        acc = pairs if acc is None else builder.add(acc, pairs)
    s = _even_odd_add(builder, acc)
    return s if out is None else builder.add(out, s)


def _bias_ptr(context, builder, arrty, arr, blk, per_block):
    """The activations' offset terms from block blk on: xb (8 int32 a block, as <8 x i32>*) or xs (per_block = 1:
    one int32 a block, as i32*; the repacked Q4_0 dots, see quant.quantize_acts)."""
    ty = ir.VectorType(_i32, 8) if per_block == 8 else _i32
    return builder.bitcast(_ptr(context, builder, arrty, arr, builder.mul(blk, ir.Constant(blk.type, 4 * per_block))),
                           ty.as_pointer())


def _vnni_dot_setup(context, builder, sig, args, per_block=8, generic=False):
    """The VNNI row dots' pointers (weights, x8, xd as float*, the offset terms: _bias_ptr) and vpdpbusd (generic: its
    arithmetic in plain vector IR, _dpbusd_generic)."""
    w, woff, nb, x8, xoff, xd, xb, xdoff = args
    f32 = ir.FloatType()
    wp = _ptr(context, builder, sig.args[0], w, woff)
    xp = _ptr(context, builder, sig.args[3], x8, xoff)
    xdp = builder.bitcast(_ptr(context, builder, sig.args[5], xd, builder.mul(xdoff, ir.Constant(xdoff.type, 4))),
                          f32.as_pointer())
    dp = _dpbusd_generic(builder) if generic else _vpdpbusd(builder)
    return wp, xp, xdp, _bias_ptr(context, builder, sig.args[6], xb, xdoff, per_block), dp


TOKENS = 4  # tokens per call of dot_tokens_q4_0r_vnni
# tokens per call of the repacked K-quants' token dots: their super-block's unpacking (scales, fifth or high bits) is
# dearer than a Q4_0 group's, so spread over more tokens. A/B on 8192 x 2048 random rows, T = 64: Q4_KR 178 -> 189,
# Q5_KR 157 -> 175, Q6_KR 138 -> 143 G MAC/s at 8 against 4; repacked Q4_0 falls from 192 to 156 at 8.
TOKENS_K = 8


def _row_intrinsic(token_dots, doc, generic=False, per_block=8, small=False, signed=False):
    """A VNNI row dot with one token (the signature of dot_row_q4_0_vnni) through token_dots(builder, wp, nb, xps,
    xdps, xbps, dp), the same code _tokens_intrinsic runs for TOKENS tokens: the two forms give identical results.
    generic: vpdpbusd's arithmetic in plain vector IR (every CPU), the same results; small: the weight bytes are
    below 128, so the generic route may take _dpbusd_small's pmaddubsw; signed: an offset-128 frame, which may take
    _dpbssd_avx2 (_route_dp)."""
    @intrinsic
    def row_dot(typingctx, w, woff, nb, x8, xoff, xd, xb, xdoff):
        sig = types.float32(w, woff, nb, x8, xoff, xd, xb, xdoff)

        def codegen(context, builder, signature, args):
            wp, xp, xdp, xbp, _ = _vnni_dot_setup(context, builder, signature, args, per_block, generic)
            dp = _route_dp(builder, generic, small, signed)
            return token_dots(builder, wp, args[2], [xp], [xdp], [xbp], dp)[0]

        return sig, codegen if generic else _vnni_or_trap(codegen)

    row_dot.__doc__ = doc
    return row_dot


def _routes(token_dots, name, per_block=8, tokens=TOKENS, small=False, signed=False):
    """The four intrinsics of a type dotted through token_dots: (row dot, TOKENS-token dot) through vpdpbusd (x86
    AVX512-VNNI only), then the same two with vpdpbusd's arithmetic in generic vector IR (every CPU), identical sums.
    per_block: the offset terms the dots read (_bias_ptr: 8, xb; 1, xs); tokens: of the several-token dot; small:
    weight bytes below 128 (_dpbusd_small on the generic route); signed: an offset-128 frame (_dpbssd_avx2 on the
    generic route of AVX2 CPUs)."""
    return (_row_intrinsic(token_dots, f"A {name} row's dot with one token's int8 activations through vpdpbusd.",
                           per_block=per_block),
            _tokens_intrinsic(token_dots, f"The {name} row dot for {tokens} tokens, each result the one-token dot's.",
                              per_block, tokens=tokens),
            _row_intrinsic(token_dots, f"The {name} row dot in generic IR.", True, per_block, small, signed),
            _tokens_intrinsic(token_dots, f"The {name} {tokens}-token dot in generic IR.", per_block, generic=True,
                              tokens=tokens, small=small, signed=signed))


def _tokens_intrinsic(token_dots, doc, per_block=8, generic=False, tokens=TOKENS, small=False, signed=False):
    """An intrinsic dotting one row with TOKENS tokens through token_dots (the batch matmuls' inner call): token
    k's activations at x8[xoff + k xstride:], its block scales and offset terms (per_block int32 a block:
    _bias_ptr) from block xdoff + k xdstride."""
    @intrinsic
    def dot_tokens(typingctx, w, woff, nb, x8, xoff, xstride, xd, xb, xdoff, xdstride):
        sig = types.UniTuple(types.float32, tokens)(w, woff, nb, x8, xoff, xstride, xd, xb, xdoff, xdstride)

        def codegen(context, builder, signature, args):
            w_, woff_, nb_, x8_, xoff_, xstride_, xd_, xb_, xdoff_, xdstride_ = args
            f32 = ir.FloatType()
            wp = _ptr(context, builder, signature.args[0], w_, woff_)
            xps, xdps, xbps = [], [], []
            for k in range(tokens):
                kk = ir.Constant(xstride_.type, k)
                xps.append(_ptr(context, builder, signature.args[3], x8_, builder.add(xoff_, builder.mul(xstride_, kk))))
                xdo = builder.add(xdoff_, builder.mul(xdstride_, ir.Constant(xdstride_.type, k)))
                xdps.append(builder.bitcast(_ptr(context, builder, signature.args[6], xd_,
                                                 builder.mul(xdo, ir.Constant(xdo.type, 4))), f32.as_pointer()))
                xbps.append(_bias_ptr(context, builder, signature.args[7], xb_, xdo, per_block))
            dp = _route_dp(builder, generic, small, signed)
            return context.make_tuple(builder, signature.return_type, token_dots(builder, wp, nb_, xps, xdps, xbps, dp))

        return sig, codegen if generic else _vnni_or_trap(codegen)

    dot_tokens.__doc__ = doc
    return dot_tokens
