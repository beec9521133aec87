"""sparserun: run llama-family GGUF models on consumer CPUs, computing only the FFN neurons that matter."""
from .errors import ModelFileError, SparserunError
from .model import Model, load

__version__ = "0.1.0"
__all__ = ["load", "Model", "SparserunError", "ModelFileError", "__version__"]
