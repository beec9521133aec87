import os
import sys
from pathlib import Path

# GPU code (sparserun/hybrid.py) runs under numba's CUDA simulator in the tests, so CI needs no GPU; set
# NUMBA_ENABLE_CUDASIM=0 to run the same tests on a real one. Must be set before numba.cuda is imported.
os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

import pytest

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / "tests" / "data"  # test data shipped with the repository (provenance: tests/data/README.md)
sys.path.insert(0, str(REPO))  # models/ (the test-model generator) is a folder of the repo, not installed

STORIES = DATA / "models" / "stories260K.gguf"
VOCAB = DATA / "vocab"


@pytest.fixture(scope="session")
def stories():
    if not STORIES.exists():
        pytest.fail(f"{STORIES} is missing: the repository's test data is incomplete")
    return STORIES


@pytest.fixture(scope="session")
def make_model(tmp_path_factory):
    """make_model(type, **shape) -> path of a generated random llama GGUF, cached for the session."""
    from models.make_test_model import make_model as mk

    cache = {}
    root = tmp_path_factory.mktemp("models")

    def make(type="F32", shape="small", seed=1, **kw):
        key = (type, shape, seed, tuple(sorted(kw.items())))
        if key not in cache:
            name = f"{type}-{shape}-{seed}-{len(cache)}"
            cache[key] = mk(root / f"{name}.gguf", type, shape, seed=seed, **kw)
        return cache[key]

    return make


def llama_cpp_model(path, n_ctx=512):
    import llama_cpp

    from sparserun.tokenizer import quiet_stderr

    with quiet_stderr():
        return llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=n_ctx, n_threads=2, verbose=False)


def llama_cpp_logits(path, ids):
    import numpy as np

    ll = llama_cpp_model(path)
    ll.eval(ids)
    return np.array(ll.scores[: len(ids)], dtype=np.float32)
