"""The hot/cold output head (`--head hot[:K]`): logits computed exactly where they matter.

A small model's output head is most of the bytes a decode token reads (Gemma 3 270M: the tied 262,144 x 640
embedding is 72% of them), and which rows matter is Zipfian, as PowerInfer's neurons are. Per token:

    hot = W[hot_ids] h                   exact, K rows stored contiguously (hot first)    (K,)
    est = A (P h)                        every cold row, estimated: rank r, A in Q4_0      (V - K,)
    cand = top M cold rows by est  +  cold tokens of the context (prompt and output so far)
    logits[cand] = W[cand] h             exact, the file's rows dotted in place
    logits = hot, exact candidates and estimates elsewhere                                  (V,)

P (r, dim) and A come from fit_estimate: the cold rows' principal projection, or with a profile the projection of
least logit error over the profile's head inputs. A is stored as Q4_0 (4 bits a value, a scale per 32) and dotted
in integers with P h rounded to int8 blocks: 72 bytes a row at r = 128, where the head reads its row (680 bytes for
Q8_0 at 640 wide). The estimate is computed once per model and hot set and cached beside the neuron packs, bound to
the model's fingerprint. A hot set covering the whole vocabulary is the dense head exactly.

K, r and M were chosen on Gemma 3 270M (docs/PERFORMANCE_LOG.md): per-32 scales on A matter (one scale a row cost 2
points of perplexity at r = 128), rank 128 in 4 bits beats rank 64 in 8 at the same bytes, and M = 1024 exact rows
bring the cold tokens a text uses into the exact set.

The hot set: the K tokens most frequent in a profile's corpus (the text's own tokens and the dense model's argmax
over it: `sparserun profile` records both, with the head inputs' moment the estimate is fitted to). Without a
profile, the same statistics come from one pass over Python's documentation text at first use (builtin_statistics,
cached): on Gemma 3 270M over GPL-3 that took the hot head's perplexity from +18.4% (the K lowest token ids that
are not unused slots, the estimate from the rows alone: default_order) to about a profile's.
"""
import hashlib
import os
import sys

import numpy as np

from .errors import SparserunError
from .kernels import head as KH
from .kernels import quant as K

RANK = 128  # the cold estimate's rank (a multiple of 32: Q4_0 blocks)
TOP = 2048  # cold rows computed exactly per token, by estimate (top_rows keeps 1-3x as many)
UNUSED = 5  # llama.cpp's token type of unused vocabulary slots


def parse_head(spec, n_vocab):
    """"dense" -> None; "hot" -> a default K; "hot:K" -> K (a count or a fraction of the vocabulary)."""
    spec = (spec or "dense").strip().lower()
    if spec == "dense":
        return None
    name, _, arg = spec.partition(":")
    if name != "hot":
        raise SparserunError(f"--head {spec}: unknown head (choose dense, hot or hot:K)")
    if not arg:
        return min(n_vocab, 32768)
    try:
        k = float(arg) if "." in arg else int(arg)
    except ValueError:
        raise SparserunError(f"--head {spec}: {arg!r} is not a count or a fraction") from None
    k = int(round(k * n_vocab)) if isinstance(k, float) else k
    if not 1 <= k <= n_vocab:
        raise SparserunError(f"--head {spec}: K must be between 1 and the vocabulary's {n_vocab} tokens")
    return k


def default_order(model):
    """Token ids by presumed frequency without a profile: ascending id, unused slots last."""
    types = model.gguf.metadata.get("tokenizer.ggml.token_type")
    ids = np.arange(model.args.n_vocab)
    if types is None or len(types) != len(ids):
        return ids
    unused = np.asarray(types) == UNUSED
    return np.concatenate([ids[~unused], ids[unused]])


def frequency_order(freq):
    """Token ids by decreasing frequency, ties by ascending id."""
    return np.lexsort((np.arange(len(freq)), -np.asarray(freq, np.float64)))


def _sqrt_and_inverse(g):
    vals, vecs = np.linalg.eigh(g)
    vals = np.maximum(vals, vals.max() * 1e-9)
    return (vecs * np.sqrt(vals)) @ vecs.T, (vecs / np.sqrt(vals)) @ vecs.T


def fit_estimate(w, cold, rank, cov=None, chunk=16384):
    """(P (rank, dim), A (rows, rank)) with estimate_j = A_j . (P h), fitted to the cold rows and given for every row.

    Without hidden states (cov None): P spans the cold rows' top principal directions, A = W_cold P^T. With cov, the
    second moment of the head's inputs over a corpus (profile.head_covariance), the estimate minimises the mean
    squared logit error over such inputs: with G = W_cold^T W_cold and U the top eigenvectors of G^1/2 C G^1/2,
    P = U^T G^1/2 and A = W_cold G^-1/2 U (on Gemma 3 270M's head: logit error std 2.29 against 2.65, top-1 0.9935
    against 0.9837 at K 32768, r 32). Rows are read in chunks (a 262k x 640 head is 670 MB as floats)."""
    gram = np.zeros((w.cols, w.cols), np.float64)
    for s in range(0, len(cold), chunk):
        x = w.rows_f32(cold[s:s + chunk]).astype(np.float64)
        gram += x.T @ x
    if not np.isfinite(gram).all():
        raise SparserunError(f"tensor '{w.name}' holds a non-finite value (NaN or Inf) in its rows: the output head "
                             "cannot be estimated (--check-tensors checks every tensor at load)")
    if cov is None:
        _, vecs = np.linalg.eigh(gram)
        p = left = vecs[:, ::-1][:, :rank].T  # (rank, dim), largest eigenvalues first
    else:
        half, inv_half = _sqrt_and_inverse(gram)
        _, u = np.linalg.eigh(half @ np.asarray(cov, np.float64) @ half)
        u = u[:, ::-1][:, :rank]  # (dim, rank)
        p, left = u.T @ half, u.T @ inv_half
    p, left = np.ascontiguousarray(p, np.float32), np.ascontiguousarray(left, np.float32)
    a = np.empty((w.rows, rank), np.float32)
    for s in range(0, w.rows, chunk):
        a[s:s + chunk] = w.rows_f32(np.arange(s, min(w.rows, s + chunk))) @ left.T  # (n, rank)
    return p, a


def quantize_estimate(a):
    """The estimate's factor a (n, rank) as Q4_0 rows (n, rank / 32 * 18 bytes): 4 bits a value and an fp16 scale per
    32, dotted with the token's basis coordinates in integers (kernels.head.estimate)."""
    from gguf import GGMLQuantizationType, quants

    return np.ascontiguousarray(quants.quantize(np.ascontiguousarray(a, np.float32), GGMLQuantizationType.Q4_0))


class HotHead:
    """The output head under `--head hot[:K]`. Called with the final normed hidden states as Weight.matmul is, plus
    the context's token ids; returns (T, V) logits: exact for the hot rows, the top cold rows by estimate and the
    context's tokens, estimated elsewhere."""

    def __init__(self, model, k, order=None, cov=None, rank=RANK, top=TOP, source=None):
        w = model.output
        self.w, self.n_vocab = w, w.rows
        self.file_w = w.origin or w  # the exact cold rows are dotted where they lie (the file's map, or its copy)
        order = default_order(model) if order is None else np.asarray(order, np.int64)
        self.hot = np.sort(order[:k]).astype(np.int64)  # (K,) vocabulary ids computed exactly every token
        self.is_cold = np.ones(w.rows, bool)  # (V,)
        self.is_cold[self.hot] = False
        self.cold = np.nonzero(self.is_cold)[0].astype(np.int64)  # (V - K,)
        self.hot_w = w.subset(self.hot, f"{w.name}[hot]") if len(self.cold) else w
        self.rank = max(32, min(rank, w.cols) // 32 * 32) if len(self.cold) else 0
        self.calibrated = cov is not None
        self.source = source or ("given hidden states" if self.calibrated else "the rows alone")
        self.p, codes = self._estimate(model, cov)  # (r, dim) float32, (V, r / 32 * 18) Q4_0 rows
        # the estimate 8 rows a tile, for each tile that holds a cold row, so that it lands in the logits in place (a
        # tile's hot rows are overwritten; the hot set is mostly runs of ids, so few tiles mix the two: on Gemma 3 270M
        # 99% of the 32,768 hot rows lie in tiles of hot rows only). Scattering the cold rows' estimates cost more.
        cold_tiles = np.zeros(-(-w.rows // KH.TILE_ROWS) * KH.TILE_ROWS, bool)
        cold_tiles[:w.rows] = self.is_cold
        self.tile_ids = np.nonzero(cold_tiles.reshape(-1, KH.TILE_ROWS).any(1))[0]  # (n_tiles,) tile t: rows 8t..8t+7
        self.tiles = KH.tile_q4_0(codes)[self.tile_ids] if len(self.cold) else codes  # (n_tiles, r / 32 * 144)
        self.top = min(top, len(self.cold))
        self.cand = np.empty(max(3 * self.top, 1), np.int64)  # top_rows keeps top to 3 x top rows
        self.mark = np.zeros(w.rows, np.uint8)  # (V,) scratch of KH.exact_set
        self.last_estimates = None  # set to an array to keep the last row's estimates there (tests)
        self.computed = 0  # cold rows computed exactly, summed over rows of logits
        self.cold_argmax = 0  # rows whose largest logit was a cold row's
        self.rows = 0  # rows of logits produced

    def _estimate(self, model, cov):
        """(P, every row's estimate factor as Q4_0 rows), fitted to the cold rows: from the cache beside the neuron packs,
        else fitted (seconds) and cached."""
        if not len(self.cold):
            return np.zeros((0, self.w.cols), np.float32), np.zeros((0, 0), np.uint8)
        from .ffn_pack import cache_root

        fp = model.gguf.fingerprint()
        key = hashlib.sha256(self.hot.tobytes() + (np.asarray(cov, np.float32).tobytes() if cov is not None else b""))
        path = os.path.join(cache_root(), fp[:32], f"head.r{self.rank}.q4_0.{key.hexdigest()[:16]}.npz")
        got = load_estimate(path, fp)
        if got is not None and got[0].shape == (self.rank, self.w.cols) and \
                got[1].shape == (self.n_vocab, self.rank // 32 * 18):
            return got
        try:
            p, a = fit_estimate(self.w, self.cold, self.rank, cov)
        except SparserunError as e:
            raise SparserunError(f"{model.path}: {e}") from None
        codes = quantize_estimate(a)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = path + ".tmp.npz"
        np.savez(tmp, fingerprint=fp, p=p, codes=codes)
        os.replace(tmp, path)
        return p, codes

    def __call__(self, acts, prior=(), ids=()):
        """acts: Acts of the final normed hidden states (T, dim), row t being the last T tokens of ids in order;
        prior: the token ids already in the context before ids. Row t's context is prior and ids up to its token."""
        x = acts.x
        T = x.shape[0]
        hot = self.hot_w.matmul(acts)  # (T, K)
        if not len(self.cold):
            return hot
        logits = np.empty((T, self.n_vocab), np.float32)  # (T, V)
        ctx = np.concatenate([np.asarray(prior, np.int64), np.asarray(ids, np.int64)])  # the context's token ids
        first = len(ctx) - T  # row t's context is ctx[:first + t + 1]
        z = np.empty((T, self.rank), np.float32)  # (T, rank) the hidden states on the estimate's basis
        for t in range(T):
            KH.matvec(self.p, x[t], z[t])
        _, zd, z8, zb, _, _ = K.acts_forms(z)  # int8 blocks of z, as the Q4_0 dots read them
        bias = zb.reshape(T, -1, 8).sum(2, dtype=np.int32)  # (T, rank / 32) Q4_0's offset: -8 x each block's sum
        xq, xd, x8, xb, xt, xs = acts.forms()  # the exact rows' dots read the hidden states' int8 blocks
        self.file_w.restore()
        raw, qtype, row_bytes = self.file_w.raw, self.file_w.qtype, self.file_w.row_bytes
        exact = np.empty(len(self.cand) + len(ctx), np.int64)  # one row's exact cold rows
        for t in range(T):
            row = logits[t]
            KH.estimate(self.tiles, self.tile_ids, self.rank // 32, K.HAS_VNNI, z8[t], zd[t], bias[t], row)
            if self.last_estimates is not None:
                self.last_estimates = row.copy()
            KH.scatter(hot[t], self.hot, row)
            n = KH.top_rows(row, self.is_cold, len(self.cold), self.top, self.cand)
            n = KH.exact_set(self.cand, n, ctx, first + t + 1, self.is_cold, self.mark, exact)
            KH.exact_rows(raw, row_bytes, qtype, K.HAS_VNNI, exact[:n], x[t:t + 1], xq[t:t + 1], xd[t:t + 1],
                          x8[t:t + 1], xb[t:t + 1], xt[t:t + 1], xs[t:t + 1], row)
            self.computed += n
            self.cold_argmax += bool(self.is_cold[int(np.argmax(row))])
        self.rows += T
        return logits

    def reset_stats(self):
        self.computed = self.cold_argmax = self.rows = 0

    def describe(self):
        how = f"fitted to the hidden states of {self.source}" if self.calibrated else "from the rows alone"
        return (f"hot head: {len(self.hot)} of {self.n_vocab} rows exact every token, the other {len(self.cold)} "
                f"estimated at rank {self.rank} in 4 bits ({how}), the top {self.top} of them and the context's "
                "tokens exact")


def load_estimate(path, fingerprint):
    """(p, codes) of a cached estimate, None where there is none or it is damaged; a cache written for another
    model is refused."""
    if not os.path.exists(path):
        return None
    try:
        with np.load(path) as z:
            fp = str(z["fingerprint"])
            got = z["p"], z["codes"]
    except (OSError, ValueError, KeyError):
        return None  # damaged or partial: fitted again
    if fp != fingerprint:
        raise SparserunError(f"{path}: this head estimate was made for another model (fingerprint {fp[:12]}..., "
                             f"the model is {fingerprint[:12]}...)")
    p, codes = got
    scales = codes.reshape(len(codes), -1, 18)[:, :, :2].copy().view(np.float16) if codes.size else codes
    if not (np.isfinite(p).all() and np.isfinite(scales).all()):
        return None
    return got


STATS_TOKENS = 4096  # of the built-in text, for a model without a profile (builtin_statistics)


def builtin_statistics(model):
    """(token frequency (V,), head-input moment (dim, dim)) as a profile records them (the text's tokens and the dense
    model's argmax over it; the mean h h^T of the head's inputs), from one dense pass over the first STATS_TOKENS of
    teal.builtin_text() (Python's documentation, shipped with CPython): the hot set and the estimate's basis of a
    model without a profile. Cached beside the neuron packs, bound to the model's fingerprint. The pass clears the
    model's context (the next eval recomputes it)."""
    from .activations import watch_ffn
    from .ffn_pack import cache_root
    from .profile import HeadStats
    from .teal import builtin_text

    fp = model.gguf.fingerprint()
    path = os.path.join(cache_root(), fp[:32], "head.stats.npz")
    if os.path.exists(path):
        try:
            with np.load(path) as z:
                if str(z["fingerprint"]) == fp and z["freq"].shape == (model.output.rows,):
                    return z["freq"], z["cov"]
        except (OSError, ValueError, KeyError):
            pass  # damaged: recomputed
    ids = model.tokenize(builtin_text())[:STATS_TOKENS]
    print(f"hot head: no profile; token counts and head inputs from Python's documentation text ({len(ids)} tokens), "
          f"cached in {path}", file=sys.stderr)
    stats = HeadStats(model, ids)
    watch_ffn(model, ids, None, batch=min(256, model.n_ctx), on_head=stats)
    freq, cov = stats.result()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp.npz"
    np.savez(tmp, fingerprint=fp, freq=freq, cov=cov)
    os.replace(tmp, path)
    return freq, cov


def make_head(model, spec, profile=None):
    """The head for `--head SPEC`: None for dense, else a HotHead whose hot set and estimate come from the model's
    profile (a path, or <model>.gguf.profile.gguf when it exists and records token frequencies), else from
    builtin_statistics (a pass over Python's documentation at first use, cached)."""
    k = parse_head(spec, model.output.rows)
    if k is None:
        return None
    from .profile import load_profile
    from .side_files import PROFILE

    path = PROFILE.given_or_default(profile, model.path)
    prof = load_profile(path, model) if path else None
    if prof is not None and prof.token_frequency is not None and len(prof.token_frequency) == model.output.rows:
        return HotHead(model, k, frequency_order(prof.token_frequency), prof.head_covariance, source="a profile")
    freq, cov = builtin_statistics(model)
    return HotHead(model, k, frequency_order(freq), cov, source="Python's documentation text (no profile)")
