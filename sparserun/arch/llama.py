"""llama (Llama 1/2/3, TinyLlama, Mistral-style, SmolLM2): the shared block with no switches set.

Activation: llama.cpp always computes SiLU for `llama`; this runtime honours the string key
`<arch>.ffn_activation` ("silu" default, "relu", "gelu") so ReLU-family sparse models can be run.
The FFN is gated (act(gate) * up) when blk.N.ffn_gate.weight exists, plain act(up) otherwise. PowerInfer's PWRI
files (powerinfer.py) run ReLU and store ffn_down transposed.
"""
from .. import powerinfer
from .base import common_args

NAMES = ("llama",)


def model_args(f):
    return common_args(f, **powerinfer.switches(f))  # a PWRI file runs ReLU, as PowerInfer's sparse graph does
