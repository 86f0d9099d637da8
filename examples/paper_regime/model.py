"""A small GPT in the paper's regime: separate Q/K/V/O and MLP matrices, GPT-2 init, bytes.

The paper (Cao et al., arXiv 2602.01308) smooths Q, K and V apart, and the issue that asked for this
model (v1's fused QKV) is why each projection is its own `nn.Linear` here. Parameter names follow
the Llama/GPT-2 conventions that `pss scan` classifies (`q_proj`, `k_proj`, `v_proj`, `o_proj`,
`c_fc`, `c_proj`, `wte`, `wpe`, `lm_head`).

Two switches exist only for the experiment's arms and stressors:
- `post_ln`: Post-LN blocks (x = LN(x + f(x))), the original Transformer's layout, which is known
  to diverge without warm-up (Xiong et al. 2020, "On Layer Normalization in the Transformer
  Architecture");
- `qk_norm`: LayerNorm on queries and keys per head, the fix for attention-logit growth measured
  by Wortsman et al. 2023 ("Small-scale proxies for large-scale Transformer training
  instabilities", arXiv 2309.14322).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 256  # byte-level tokens
    context: int = 64
    width: int = 128
    n_layer: int = 2
    n_head: int = 4
    mlp_ratio: int = 4
    post_ln: bool = False
    qk_norm: bool = False

    def to_json(self) -> dict[str, int | bool]:
        return asdict(self)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_head = cfg.n_head
        head = cfg.width // cfg.n_head
        self.q_proj = nn.Linear(cfg.width, cfg.width)
        self.k_proj = nn.Linear(cfg.width, cfg.width)
        self.v_proj = nn.Linear(cfg.width, cfg.width)
        self.o_proj = nn.Linear(cfg.width, cfg.width)
        self.q_norm = nn.LayerNorm(head) if cfg.qk_norm else None
        self.k_norm = nn.LayerNorm(head) if cfg.qk_norm else None
        # Set by `max_attention_logit`: the largest |q.k|/sqrt(d) of the last forward pass.
        self.record_logits = False
        self.max_logit = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        h = self.n_head

        def heads(z: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, H, T, C/H)
            return z.view(b, t, h, c // h).transpose(1, 2)

        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.record_logits:
            logits = q @ k.transpose(-2, -1) / math.sqrt(c // h)
            mask = torch.ones(t, t, dtype=torch.bool).tril()
            self.max_logit = float(logits.abs().masked_fill(~mask, 0.0).max())
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        out: torch.Tensor = self.o_proj(y.transpose(1, 2).reshape(b, t, c))
        return out


class Mlp(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(cfg.width, cfg.mlp_ratio * cfg.width)
        self.c_proj = nn.Linear(cfg.mlp_ratio * cfg.width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.c_proj(F.gelu(self.c_fc(x)))
        return out


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.post_ln = cfg.post_ln
        self.ln_1 = nn.LayerNorm(cfg.width)
        self.attn = Attention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.width)
        self.mlp = Mlp(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.post_ln:
            x = self.ln_1(x + self.attn(x))
            out: torch.Tensor = self.ln_2(x + self.mlp(x))
            return out
        x = x + self.attn(self.ln_1(x))
        out = x + self.mlp(self.ln_2(x))
        return out


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.width)
        self.wpe = nn.Embedding(cfg.context, cfg.width)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.width)


class PaperGPT(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.transformer = Transformer(cfg)
        self.lm_head = nn.Linear(cfg.width, cfg.vocab_size, bias=False)

    def init_weights(self, generator: torch.Generator) -> None:
        """GPT-2 initialisation: N(0, 0.02), residual projections scaled by 1/sqrt(2 n_layer)."""
        residual_std = 0.02 / math.sqrt(2 * self.cfg.n_layer)
        for name, param in self.named_parameters():
            if name.endswith(".bias"):
                nn.init.zeros_(param)
            elif ".ln_" in name or "_norm." in name:
                nn.init.ones_(param)
            else:
                residual = name.endswith(("o_proj.weight", "c_proj.weight"))
                with torch.no_grad():
                    param.normal_(0.0, residual_std if residual else 0.02, generator=generator)

    def logits(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        pos = torch.arange(t, device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)  # (B, T, C)
        for block in self.transformer.h:
            x = block(x)
        out: torch.Tensor = self.lm_head(self.transformer.ln_f(x))  # (B, T, V)
        return out

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor, z_loss: float = 0.0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss to optimise, cross-entropy): the first adds z_loss * mean(log^2 Z), the
        output-logit regulariser of PaLM that Wortsman et al. 2023 use at 1e-4."""
        logits = self.logits(idx)
        flat = logits.reshape(-1, logits.shape[-1])
        ce = F.cross_entropy(flat, targets.reshape(-1))
        if z_loss:
            return ce + z_loss * torch.logsumexp(flat, dim=-1).pow(2).mean(), ce
        return ce, ce

    @torch.no_grad()
    def max_attention_logit(self, idx: torch.Tensor) -> float:
        """The largest |q.k|/sqrt(d_head) over layers, heads and causal positions for `idx`."""
        attns = [block.attn for block in self.transformer.h]
        for a in attns:
            a.record_logits = True
        try:
            self.logits(idx)
        finally:
            for a in attns:
                a.record_logits = False
        return max(a.max_logit for a in attns)
