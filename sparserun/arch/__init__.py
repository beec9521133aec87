"""Architecture registry: general.architecture -> the module whose model_args(gguf) builds its ModelArgs.

Every architecture runs the one shared block (model.Model._block); a module sets the switches in which its family
differs from llama (arch/base.py lists them). Adding an architecture is a module here and its line in MODULES.
"""
from ..errors import ModelFileError
from . import bamboo, gemma3, llama, phi3, qwen2, qwen3
from .base import ROPE_NEOX, ROPE_NORM, ModelArgs  # noqa: F401

MODULES = (llama, qwen2, qwen3, gemma3, phi3, bamboo)
ARCHITECTURES = {name: module for module in MODULES for name in module.NAMES}


def model_args(gguf):
    arch = gguf.architecture
    module = ARCHITECTURES.get(arch)
    if module is None:
        raise ModelFileError(gguf.path, f"unsupported architecture {arch!r} (supported: {', '.join(sorted(ARCHITECTURES))})")
    try:
        return module.model_args(gguf)
    except (TypeError, ValueError, OverflowError):  # a key of the wrong kind (a string or an array for a count...)
        raise ModelFileError(gguf.path, "malformed hyperparameters (a value of the wrong kind)") from None
