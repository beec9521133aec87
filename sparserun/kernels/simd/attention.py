"""Attention's intrinsics (kernels.ops.attention): scores of a block of keys for up to 8 queries, and the value
rows summed into register accumulators.
"""
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic
from .ir import (_fma, _ptr, _splat_f)

# Attention (kernels.ops.attention): a block of KEY_BLOCK keys is stored transposed, (head_dim, KEY_BLOCK), so one
# vector load holds one dimension of 16 keys and H queries' scores accumulate in H vector registers with no
# horizontal sums; value rows are summed into H x (8 ncols) accumulators held in registers across the keys.
KEY_BLOCK = 16


def _cache_floats(builder, arrty, p, n):
    """n consecutive cache values at byte pointer p as <n x float>: IEEE halves (uint16 caches) or float32."""
    if arrty.dtype == types.uint16:
        h = builder.load(builder.bitcast(p, ir.VectorType(ir.HalfType(), n).as_pointer()), align=2)
        return builder.fpext(h, ir.VectorType(ir.FloatType(), n))
    return builder.load(builder.bitcast(p, ir.VectorType(ir.FloatType(), n).as_pointer()), align=4)


def _f32_ptr(context, builder, arrty, arr, idx):
    """Pointer to float32 element idx of a float32 array."""
    off = builder.mul(_as_i64(builder, idx), ir.Constant(ir.IntType(64), 4))
    return builder.bitcast(_ptr(context, builder, arrty, arr, off), ir.FloatType().as_pointer())


def _as_i64(builder, v):
    return builder.sext(v, ir.IntType(64)) if v.type.width < 64 else v


def _key_block_dots(H):
    @intrinsic
    def key_block_dots(typingctx, kc, kidx, hd, qs, qidx, s, sidx, sstride):
        """s[sidx + h sstride + l] = sum_{d < hd} qs[qidx + h hd + d] * K[d, l] for h < H queries and l < KEY_BLOCK
        keys, the key block (hd, KEY_BLOCK) starting at element kidx of the cache kc (float32 or IEEE half bits)."""
        sig = types.void(kc, kidx, hd, qs, qidx, s, sidx, sstride)

        def codegen(context, builder, signature, args):
            kc_a, ki, hd_v, qs_a, qi, s_a, si, ss = args
            i64, v = ir.IntType(64), ir.VectorType(ir.FloatType(), KEY_BLOCK)
            c = lambda x: ir.Constant(i64, x)
            esize = c(2 if signature.args[0].dtype == types.uint16 else 4)
            kp = _ptr(context, builder, signature.args[0], kc_a, builder.mul(_as_i64(builder, ki), esize))
            qp = _f32_ptr(context, builder, signature.args[3], qs_a, qi)
            hd = _as_i64(builder, hd_v)
            accs = [cgutils.alloca_once_value(builder, ir.Constant(v, [0.0] * KEY_BLOCK)) for _ in range(H)]
            with cgutils.for_range(builder, hd) as loop:
                d = loop.index
                row = builder.gep(kp, [builder.mul(d, builder.mul(c(KEY_BLOCK), esize))])
                kv = _cache_floats(builder, signature.args[0], row, KEY_BLOCK)
                for h in range(H):
                    q = builder.load(builder.gep(qp, [builder.add(builder.mul(c(h), hd), d)]))
                    qv = _splat_f(builder, q, KEY_BLOCK)
                    builder.store(_fma(builder, kv, qv, builder.load(accs[h])), accs[h])
            sp = _f32_ptr(context, builder, signature.args[5], s_a, si)
            for h in range(H):
                dst = builder.gep(sp, [builder.mul(c(h), _as_i64(builder, ss))])
                builder.store(builder.load(accs[h]), builder.bitcast(dst, v.as_pointer()), align=4)
            return context.get_dummy_value()

        return sig, codegen

    return key_block_dots


def _value_rows_sum(H, NCH):
    @intrinsic
    def value_rows_sum(typingctx, vc, vidx, hd, n, w, widx, wstride, acc, aidx):
        """acc[aidx + h hd + c] += sum_{j < n} w[widx + h wstride + j] * V[j, c] for h < H weight rows and c < 8 NCH
        columns, value row j's columns from element vidx + j hd of the cache vc (float32 or IEEE half bits): the
        H x NCH accumulators stay in registers across the rows."""
        sig = types.void(vc, vidx, hd, n, w, widx, wstride, acc, aidx)

        def codegen(context, builder, signature, args):
            vc_a, vi, hd_v, n_v, w_a, wi, ws, acc_a, ai = args
            i64, v8 = ir.IntType(64), ir.VectorType(ir.FloatType(), 8)
            c = lambda x: ir.Constant(i64, x)
            esize = c(2 if signature.args[0].dtype == types.uint16 else 4)
            hd, ws = _as_i64(builder, hd_v), _as_i64(builder, ws)
            vp = _ptr(context, builder, signature.args[0], vc_a, builder.mul(_as_i64(builder, vi), esize))
            wp = _f32_ptr(context, builder, signature.args[4], w_a, wi)
            ap = _f32_ptr(context, builder, signature.args[7], acc_a, ai)
            accs = []
            for h in range(H):
                for k in range(NCH):
                    p = builder.bitcast(builder.gep(ap, [builder.add(builder.mul(c(h), hd), c(8 * k))]), v8.as_pointer())
                    accs.append((p, cgutils.alloca_once_value(builder, builder.load(p, align=4))))
            with cgutils.for_range(builder, _as_i64(builder, n_v)) as loop:
                j = loop.index
                row = builder.gep(vp, [builder.mul(builder.mul(j, hd), esize)])
                vv = [_cache_floats(builder, signature.args[0], builder.gep(row, [builder.mul(c(8 * k), esize)]), 8)
                      for k in range(NCH)]
                for h in range(H):
                    wv = _splat_f(builder, builder.load(builder.gep(wp, [builder.add(builder.mul(c(h), ws), j)])), 8)
                    for k in range(NCH):
                        a = accs[NCH * h + k][1]
                        builder.store(_fma(builder, vv[k], wv, builder.load(a)), a)
            for p, a in accs:
                builder.store(builder.load(a), p, align=4)
            return context.get_dummy_value()

        return sig, codegen

    return value_rows_sum


ATTENTION_HEADS = (8, 4, 1)  # queries one key_block_dots / value_rows_sum call takes, largest first
key_block_dots = {H: _key_block_dots(H) for H in ATTENTION_HEADS}
value_rows_sum = {(H, NCH): _value_rows_sum(H, NCH) for H in ATTENTION_HEADS for NCH in (1, 2, 4)}
