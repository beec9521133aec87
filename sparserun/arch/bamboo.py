"""bamboo (PowerInfer's Bamboo-7B): llama's block with ReLU on both halves of the gated FFN, relu(gate) * relu(up)
(PowerInfer's llama.cpp: LLM_FFN_SYM for LLM_ARCH_BAMBOO in build_llama_variants, dense and sparse alike)."""
from .. import powerinfer
from .base import common_args

NAMES = ("bamboo",)


def model_args(f):
    m = common_args(f, **{**powerinfer.switches(f), "activation": "relu_sym"})
    m.features.append("ReLU on gate and up")
    return m
