"""The hot/cold output head (`--head hot[:K]`): logits computed exactly where they matter.

A small model's output head is most of the bytes a decode token reads (Gemma 3 270M: the tied 262,144 x 640
embedding is 72% of them), and which rows matter is Zipfian, as PowerInfer's neurons are. Per token:

    hot = W[hot_ids] h                   exact, K rows stored contiguously (hot first)    (K,)
    est = s * (A_int8 (P h))             every cold row, estimated: rank r, 8 bits         (V - K,)
    cand = top M cold rows by est  +  cold tokens of the context (prompt and output so far)
    logits[cand] = W[cand] h             exact
    logits = hot, exact candidates and estimates elsewhere                                  (V,)

P (r, dim) and A (int8, a scale per row) come from fit_estimate: the cold rows' principal projection, or with a
profile the projection of least logit error over the profile's head inputs. The estimate reads r bytes a row where
the head reads its row (680 bytes for Q8_0 at 640 wide). The estimate is computed once per model and hot set and cached beside the neuron packs,
bound to the model's fingerprint. A hot set covering the whole vocabulary is the dense head exactly.

The hot set: the K tokens most frequent in a profile's corpus (the text's own tokens and the dense model's argmax
over it: `sparserun profile` records both) when the model has a profile, else the K lowest token ids that are
not unused slots (BPE and SentencePiece vocabularies number their tokens roughly by frequency).
"""
import hashlib
import os

import numpy as np

from .errors import SparserunError
from .kernels import head as KH

RANK = 64  # the cold estimate's rank: 32 and 64 measured in docs/PERFORMANCE_LOG.md (64: a third fewer misses)
TOP = 256  # cold rows computed exactly per token, by estimate
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
    """(P (rank, dim), A int8 (n_cold, rank), scale (n_cold,)) with estimate_j = scale_j A_j . (P h).

    Without hidden states (cov None): P spans the cold rows' top principal directions, A = W_cold P^T. With cov, the
    second moment of the head's inputs over a corpus (profile.head_covariance), the estimate minimises the mean
    squared logit error over such inputs: with G = W_cold^T W_cold and U the top eigenvectors of G^1/2 C G^1/2,
    P = U^T G^1/2 and A = W_cold G^-1/2 U (on Gemma 3 270M's head: logit error std 2.29 against 2.65, top-1 0.9935
    against 0.9837 at K 32768, r 32). Rows are read in chunks (a 262k x 640 head is 670 MB as floats)."""
    gram = np.zeros((w.cols, w.cols), np.float64)
    for s in range(0, len(cold), chunk):
        x = w.rows_f32(cold[s:s + chunk]).astype(np.float64)
        gram += x.T @ x
    if cov is None:
        _, vecs = np.linalg.eigh(gram)
        p = left = vecs[:, ::-1][:, :rank].T  # (rank, dim), largest eigenvalues first
    else:
        half, inv_half = _sqrt_and_inverse(gram)
        _, u = np.linalg.eigh(half @ np.asarray(cov, np.float64) @ half)
        u = u[:, ::-1][:, :rank]  # (dim, rank)
        p, left = u.T @ half, u.T @ inv_half
    p, left = np.ascontiguousarray(p, np.float32), np.ascontiguousarray(left, np.float32)
    a = np.empty((len(cold), rank), np.int8)
    scale = np.empty(len(cold), np.float32)
    for s in range(0, len(cold), chunk):
        proj = w.rows_f32(cold[s:s + chunk]) @ left.T  # (n, rank)
        m = np.abs(proj).max(1)
        sc = np.where(m > 0, m / 127.0, 1.0).astype(np.float32)
        a[s:s + chunk] = np.clip(np.rint(proj / sc[:, None]), -127, 127).astype(np.int8)
        scale[s:s + chunk] = sc
    return p, a, scale


class HotHead:
    """The output head under `--head hot[:K]`. Called with the final normed hidden states as Weight.matmul is, plus
    the context's token ids; returns (T, V) logits: exact for the hot rows, the top cold rows by estimate and the
    context's tokens, estimated elsewhere."""

    def __init__(self, model, k, order=None, cov=None, rank=RANK, top=TOP):
        w = model.output
        self.w, self.n_vocab = w, w.rows
        order = default_order(model) if order is None else np.asarray(order, np.int64)
        self.hot = np.sort(order[:k]).astype(np.int64)  # (K,) vocabulary ids computed exactly every token
        self.is_cold = np.ones(w.rows, bool)  # (V,)
        self.is_cold[self.hot] = False
        self.cold = np.nonzero(self.is_cold)[0].astype(np.int64)  # (V - K,)
        self.hot_w = w.subset(self.hot, f"{w.name}[hot]") if len(self.cold) else w
        self.rank = min(rank, w.cols) if len(self.cold) else 0
        self.calibrated = cov is not None
        self.p, self.a, self.scale = self._estimate(model, cov)
        self.top = min(top, len(self.cold))
        self.est = np.empty(len(self.cold), np.float32)  # (V - K,) one token's estimates
        self.cand = np.empty(max(self.top, 1), np.int64)
        self.computed = 0  # cold rows computed exactly, summed over rows of logits
        self.cold_argmax = 0  # rows whose largest logit was a cold row's
        self.rows = 0  # rows of logits produced

    def _estimate(self, model, cov):
        """The cold rows' estimate: from the cache beside the neuron packs, else fitted (a few seconds) and cached."""
        if not len(self.cold):
            return np.zeros((0, self.w.cols), np.float32), np.zeros((0, 0), np.int8), np.zeros(0, np.float32)
        from .ffn_pack import cache_root

        fp = model.gguf.fingerprint()
        key = hashlib.sha256(self.hot.tobytes() + (np.asarray(cov, np.float32).tobytes() if cov is not None else b""))
        path = os.path.join(cache_root(), fp[:32], f"head.r{self.rank}.{key.hexdigest()[:16]}.npz")
        got = load_estimate(path, fp)
        if got is not None and got[0].shape == (self.rank, self.w.cols) and got[1].shape == (len(self.cold), self.rank):
            return got
        p, a, scale = fit_estimate(self.w, self.cold, self.rank, cov)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = path + ".tmp.npz"
        np.savez(tmp, fingerprint=fp, p=p, a=a, scale=scale)
        os.replace(tmp, path)
        return p, a, scale

    def __call__(self, acts, prior=(), ids=()):
        """acts: Acts of the final normed hidden states (T, dim), row t being the last T tokens of ids in order;
        prior: the token ids already in the context before ids. Row t's context is prior and ids up to its token."""
        x = acts.x
        T = x.shape[0]
        hot = self.hot_w.matmul(acts)  # (T, K)
        if not len(self.cold):
            return hot
        logits = np.empty((T, self.n_vocab), np.float32)  # (T, V)
        ids = np.asarray(ids, np.int64)
        first = len(ids) - T  # ids[:first + 1] are in row 0's context
        before = np.concatenate([np.asarray(prior, np.int64), ids[:max(first, 0)]])
        before = np.unique(before[(before >= 0) & (before < self.n_vocab)])
        ctx = before[self.is_cold[before]]  # the context's cold tokens: computed exactly (sorted, unique)
        z = np.empty((T, self.rank), np.float32)  # (T, rank) the hidden states on the estimate's basis
        for t in range(T):
            KH.matvec(self.p, x[t], z[t])
        for t in range(T):
            tok = ids[first + t] if first + t >= 0 else -1
            if 0 <= tok < self.n_vocab and self.is_cold[tok]:
                ctx = np.union1d(ctx, [tok])
            row = logits[t]
            KH.estimate(self.a, self.scale, z[t], self.cold, self.est, row)
            n = KH.top_rows(self.est, self.cold, self.top, self.cand)
            KH.scatter(hot[t], self.hot, row)
            exact_ids = np.union1d(self.cand[:n], ctx)
            exact = np.empty(len(exact_ids), np.float32)
            KH.matvec(self.w.rows_f32(exact_ids), x[t], exact)  # a few hundred rows: float dots
            KH.scatter(exact, exact_ids, row)
            self.computed += len(exact_ids)
            self.cold_argmax += bool(self.is_cold[int(np.argmax(row))])
        self.rows += T
        return logits

    def reset_stats(self):
        self.computed = self.cold_argmax = self.rows = 0

    def describe(self):
        how = "fitted to a profile's hidden states" if self.calibrated else "from the rows alone (no profile)"
        return (f"hot head: {len(self.hot)} of {self.n_vocab} rows exact every token, the other {len(self.cold)} "
                f"estimated at rank {self.rank} ({how}), the top {self.top} of them and the context's tokens exact")


def load_estimate(path, fingerprint):
    """(p, a, scale) of a cached estimate, None where there is none or it is damaged; a cache written for another
    model is refused."""
    if not os.path.exists(path):
        return None
    try:
        with np.load(path) as z:
            fp = str(z["fingerprint"])
            got = z["p"], z["a"], z["scale"]
    except (OSError, ValueError, KeyError):
        return None  # damaged or partial: fitted again
    if fp != fingerprint:
        raise SparserunError(f"{path}: this head estimate was made for another model (fingerprint {fp[:12]}..., "
                             f"the model is {fingerprint[:12]}...)")
    if not all(np.isfinite(v).all() for v in got if v.dtype.kind == "f"):
        return None
    return got


def make_head(model, spec, profile=None):
    """The head for `--head SPEC`: None for dense, else a HotHead whose hot set and estimate come from the model's
    profile (a path, or <model>.gguf.profile.gguf when it exists and records token frequencies)."""
    k = parse_head(spec, model.output.rows)
    if k is None:
        return None
    from .profile import load_profile
    from .side_files import PROFILE

    path = PROFILE.given_or_default(profile, model.path)
    prof = load_profile(path, model) if path else None
    if prof is not None and prof.token_frequency is not None and len(prof.token_frequency) == model.output.rows:
        return HotHead(model, k, frequency_order(prof.token_frequency), prof.head_covariance)
    return HotHead(model, k)
