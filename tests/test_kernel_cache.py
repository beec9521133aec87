"""The numba cache is cleared when any kernel source changes (numba itself only watches the defining file)."""
from sparserun import kernels


def test_stale_cache_is_cleared_and_current_one_kept(tmp_path):
    cached = [tmp_path / "quant.matmul_q4_0-1.py311.nbi", tmp_path / "quant.matmul_q4_0-1.py311.1.nbc",
              tmp_path / "ops.attention-9.py311.nbi"]
    other = tmp_path / "unrelated.f-1.py311.nbi"
    for f in cached + [other]:
        f.write_bytes(b"x")
    assert kernels.invalidate_stale_cache([str(tmp_path)], digest="old") == 3  # no stamp yet: stale
    assert not any(f.exists() for f in cached) and other.exists()
    cached[0].write_bytes(b"x")
    assert kernels.invalidate_stale_cache([str(tmp_path)], digest="old") == 0  # same sources: kept
    assert cached[0].exists()
    assert kernels.invalidate_stale_cache([str(tmp_path)], digest="new") == 1  # a source changed
    assert not cached[0].exists()


def test_digest_covers_every_kernel_source():
    import os

    assert {"simd.py", "quant.py", "dequant.py", "ops.py", "sparse.py"} <= set(kernels.SOURCES)
    assert set(kernels.SOURCES) == {f for f in os.listdir(kernels.HERE) if f.endswith(".py")} - {"__init__.py"}
    assert len(kernels.sources_digest()) == 64
