"""sparserun: run GGUF language models on consumer CPUs, computing only the parts of each layer that matter."""
from .errors import ModelFileError, SparserunError

__version__ = "0.1.0"
__all__ = ["load", "Model", "SparserunError", "ModelFileError", "__version__"]


def __getattr__(name):
    """load and Model on first use: importing a submodule that only reads files (gguf_file, arch) loads no kernels."""
    if name in ("load", "Model"):
        from . import model

        return getattr(model, name)
    raise AttributeError(f"module 'sparserun' has no attribute {name!r}")
