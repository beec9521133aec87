"""Each module imports on its own in a fresh interpreter (no import cycle that an import order hides), and opening
a file loads no kernels."""
import pkgutil
import subprocess
import sys

import pytest

import predictors
import sparserun

MODULES = sorted({m.name for m in pkgutil.walk_packages(sparserun.__path__, "sparserun.")} |
                 {m.name for m in pkgutil.iter_modules(predictors.__path__, "predictors.")})
MODULES.remove("sparserun.gpu_kernels")  # numba.cuda's kernels: imported only on a GPU path (hybrid.py)


def test_every_module_imports_alone():
    failed = []
    for name in MODULES:
        r = subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True, text=True, timeout=300)
        if r.returncode:
            failed.append((name, r.stderr.strip().splitlines()[-1]))
    assert not failed and len(MODULES) > 35, (failed, MODULES)


@pytest.mark.parametrize("module", ["sparserun", "sparserun.gguf_file", "sparserun.gguf_header", "sparserun.arch",
                                    "sparserun.info", "sparserun.qtypes", "sparserun.cache"])
def test_reading_files_imports_no_numba(module):
    r = subprocess.run([sys.executable, "-c", f"import sys, {module}; assert 'numba' not in sys.modules"],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
