"""Architecture registry: general.architecture -> module with ModelArgs.from_gguf and layer tensor names.

A llama-like family (same block structure, different metadata or tensor names) is one small module
that registers itself here.
"""
from ..errors import ModelFileError
from . import llama

ARCHITECTURES = {name: llama for name in llama.NAMES}


def model_args(gguf):
    arch = gguf.architecture
    module = ARCHITECTURES.get(arch)
    if module is None:
        raise ModelFileError(gguf.path, f"unsupported architecture {arch!r} (supported: {', '.join(sorted(ARCHITECTURES))})")
    return module.ModelArgs.from_gguf(gguf)
