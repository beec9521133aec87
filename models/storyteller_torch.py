"""The storyteller's training-time model in PyTorch (the recipe's optional dependency, never the runtime's).

A llama block exactly as sparserun and llama.cpp compute it, so the exported GGUF needs no conversion:
RMSNorm, interleaved ("normal", GGUF llama) rotary embedding on adjacent pairs, causal attention, and a gated
ReLU FFN down(relu(gate(x)) * up(x)) (ReluLLaMA style: the zeros of relu(gate) are the sparsity the runtime
skips). The output head is tied to the token embedding.
"""
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Config:
    vocab: int = 1024
    dim: int = 256
    layers: int = 6
    heads: int = 8
    ff: int = 1024
    ctx: int = 512
    rope_base: float = 10000.0
    eps: float = 1e-5


class RMSNorm(nn.Module):
    def __init__(self, d, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(d))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def rope_tables(cfg):
    hd = cfg.dim // cfg.heads
    inv = cfg.rope_base ** (-torch.arange(0, hd, 2, dtype=torch.float32) / hd)  # (hd/2,)
    ang = torch.arange(cfg.ctx, dtype=torch.float32)[:, None] * inv[None, :]  # (ctx, hd/2)
    return torch.cos(ang), torch.sin(ang)


def apply_rope(x, cos, sin):
    """x: (B, H, T, hd); rotates the adjacent pairs (x[2i], x[2i+1]) as GGUF llama (rope type NORM) does."""
    x0, x1 = x[..., 0::2], x[..., 1::2]
    T = x.shape[2]
    c, s = cos[:T], sin[:T]
    return torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1).flatten(-2)


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        d = cfg.dim
        self.heads = cfg.heads
        self.attn_norm, self.ffn_norm = RMSNorm(d, cfg.eps), RMSNorm(d, cfg.eps)
        self.q, self.k, self.v, self.o = (nn.Linear(d, d, bias=False) for _ in range(4))
        self.gate, self.up = nn.Linear(d, cfg.ff, bias=False), nn.Linear(d, cfg.ff, bias=False)
        self.down = nn.Linear(cfg.ff, d, bias=False)

    def forward(self, x, cos, sin):
        B, T, D = x.shape
        h = self.attn_norm(x)
        q, k, v = (lin(h).view(B, T, self.heads, -1).transpose(1, 2) for lin in (self.q, self.k, self.v))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.o(a.transpose(1, 2).reshape(B, T, D))
        h = self.ffn_norm(x)
        return x + self.down(F.relu(self.gate(h)) * self.up(h))


class Storyteller(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab, cfg.dim)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.layers))
        self.norm = RMSNorm(cfg.dim, cfg.eps)
        cos, sin = rope_tables(cfg)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        for name, p in self.named_parameters():
            if p.dim() == 2:
                std = 0.02 if not name.endswith(("o.weight", "down.weight")) else 0.02 / math.sqrt(2 * cfg.layers)
                nn.init.normal_(p, 0.0, std)

    def forward(self, ids):
        x = self.embed(ids)
        for b in self.blocks:
            x = b(x, self.cos, self.sin)
        return self.norm(x) @ self.embed.weight.T  # tied head

    def n_params(self):
        return sum(p.numel() for p in self.parameters())
