"""numba kernels: quant (weight types, matmuls), dequant (the other types' rows), ops (norm, rope, attention,
activations), sparse (the sparse FFN), templates (kernels stamped out per layout), simd/ (LLVM IR, by family).

numba's on-disk cache is invalidated only when the file defining a jitted function changes, not when
a function or intrinsic it calls from another file does (an edit to simd/legacy.py would leave quant.py's
kernels running stale machine code). So a hash of all kernel sources is stamped beside the cache,
and a mismatch clears this package's cached kernels before any of them is imported. The hash also covers
whether the VNNI intrinsics are real or traps (simd.HAS_X86_VNNI, which SPARSERUN_NO_VNNI=1 turns off):
kernels cached with trap bodies must not run where the VNNI branch is taken; and whether the generic route's
K-quant dots use AVX2's pmaddubsw (simd.ir.X86_AVX2, off with SPARSERUN_PORTABLE_IR=1).
"""
import glob
import hashlib
import os

HERE = os.path.dirname(os.path.abspath(__file__))
# every kernel module, as paths relative to HERE (simd/ included)
SOURCES = tuple(sorted(os.path.relpath(f, HERE) for f in glob.glob(os.path.join(HERE, "**", "*.py"), recursive=True)
                       if f != os.path.join(HERE, "__init__.py")))
STAMP = "sparserun-kernels.sha256"


def cache_dirs():
    """Where numba caches this package's kernels: NUMBA_CACHE_DIR when set (then only there), else __pycache__."""
    return [os.environ["NUMBA_CACHE_DIR"]] if os.environ.get("NUMBA_CACHE_DIR") else [os.path.join(HERE, "__pycache__")]


def _cache_files(d):
    stems = {os.path.basename(m)[:-3] for m in SOURCES}
    return [f for m in stems for ext in ("nbi", "nbc")
            for f in glob.glob(os.path.join(d, "**", f"{m}.*.{ext}"), recursive=True)]


def sources_digest(here=HERE):
    from .simd import HAS_X86_VNNI  # intrinsics only: importing it loads no cached kernel
    from .simd.ir import X86_AVX2

    h = hashlib.sha256(b"vnni=%d;avx2=%d;" % (HAS_X86_VNNI, X86_AVX2))
    for name in SOURCES:
        with open(os.path.join(here, name), "rb") as fh:
            h.update(fh.read())
    return h.hexdigest()


def invalidate_stale_cache(dirs=None, digest=None):
    """Delete cached kernels in dirs whose stamp is not the current sources' digest; returns the count."""
    digest = digest or sources_digest()
    removed = 0
    for d in dirs or cache_dirs():
        stamp = os.path.join(d, STAMP)
        try:
            with open(stamp) as fh:
                if fh.read().strip() == digest:
                    continue
        except OSError:
            pass
        for f in _cache_files(d):
            try:
                os.remove(f)
                removed += 1
            except OSError:
                pass
        try:
            os.makedirs(d, exist_ok=True)
            with open(stamp, "w") as fh:
                fh.write(digest)
        except OSError:  # read-only install: numba then caches elsewhere or not at all
            pass
    return removed


def cache_is_warm():
    """True when numba's on-disk cache already holds the kernels (no compile on this start)."""
    return any(glob.glob(os.path.join(d, "**", "quant.*matmul*.nbi"), recursive=True) for d in cache_dirs())


invalidate_stale_cache()
