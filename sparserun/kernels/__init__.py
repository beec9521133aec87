"""numba kernels: quant (weight types, matmuls), ops (norm, rope, attention, activations), simd (LLVM IR)."""
import glob
import os


def cache_is_warm():
    """True when numba's on-disk cache already holds the kernels (no compile on this start)."""
    here = os.path.dirname(__file__)
    dirs = [os.path.join(here, "__pycache__")]
    if os.environ.get("NUMBA_CACHE_DIR"):
        dirs.append(os.environ["NUMBA_CACHE_DIR"])
    return any(glob.glob(os.path.join(d, "**", "quant.matmul_*.nbi"), recursive=True) for d in dirs)
