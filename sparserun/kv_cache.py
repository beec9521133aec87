"""The run state of one context: per layer the keys and values of the tokens seen (kernels/ops.kv_shapes layout),
and the token ids they belong to. Model owns one; a caller that needs several contexts over one model (bench's
modes) makes more with fresh() and hands them to Model.use_cache.

A sliding-window layer keeps only a ring of its window plus one batch (position p in slot p % capacity, capacity a
whole number of key blocks): the keys a batch's first token still sees are not overwritten by the batch's last
ones, as llama.cpp's iSWA cache sizes its window cells (n_swa + n_ubatch). So a long context costs what it costs
llama.cpp, not n_layer x n_ctx rows.
"""
import numpy as np

from .kernels import ops
from .kernels.simd import KEY_BLOCK


def capacity(n_ctx, window, n_batch):
    """Cached positions of a layer: the whole context, or for a window its ring (window + a batch, whole blocks)."""
    if not window:
        return n_ctx
    ring = -(-(window + n_batch) // KEY_BLOCK) * KEY_BLOCK
    return min(n_ctx, ring)


class KVCache:
    def __init__(self, args, n_ctx, n_batch, kv_type):
        self.args, self.n_ctx, self.n_batch, self.kv_type = args, n_ctx, n_batch, kv_type
        dtype = ops.KV_TYPES[kv_type]
        self.k, self.v = [], []  # per layer: (n_kv, blocks, head_dim, KEY_BLOCK), (n_kv, capacity, head_dim)
        for i in range(args.n_layer):
            ks, vs = ops.kv_shapes(args.n_head_kv, capacity(n_ctx, args.window(i), n_batch), args.head_dim)
            self.k.append(np.zeros(ks, dtype))
            self.v.append(np.zeros(vs, dtype))
        self.tokens = []  # ids whose keys and values are cached, in order
        # how far back a context may be cut and still find its keys: a ring keeps capacity - window positions more
        # than its window needs (a context cut back further is recomputed, as llama.cpp's iSWA cache does)
        rings = [len(v[0]) - args.window(i) for i, v in enumerate(self.v) if len(v[0]) < n_ctx]
        self.rewind_limit = min(rings) if rings else n_ctx
    def fresh(self):
        """An empty cache of the same shapes."""
        return KVCache(self.args, self.n_ctx, self.n_batch, self.kv_type)

    @property
    def nbytes(self):
        return sum(a.nbytes for a in self.k + self.v)
