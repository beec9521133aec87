"""qwen2 (Qwen2, Qwen2.5): llama's block with q/k/v biases (loaded wherever the file has them) and NEOX RoPE
(llama.cpp's llama_model_rope_type lists QWEN2 among the NEOX architectures); output.weight optional (tied)."""
from .base import ROPE_NEOX, common_args

NAMES = ("qwen2",)


def model_args(f):
    return common_args(f, rope_type=ROPE_NEOX)
