"""A tiny GPT-style model and a deterministic training loop for the guard's tests.

The model has what the guard must handle: a token embedding tied to the LM head, a fused
q/k/v `nn.Linear` named c_attn (3d, d), attention and MLP projections, LayerNorms, biases and
dropout (on: the twin test checks that the guard never draws from the global RNG).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import pytest
import torch
from torch import nn
from torch.nn import functional as F

VOCAB = 32
WIDTH = 24
SEQ = 12


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Autouse in the modules that import it: the tiny tensors here gain nothing from threads,
    and on a loaded shared CPU intra-op threads made these tests 4-10x slower (measured: 9.2 s
    vs 2.2 s for the twin test)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


class Block(nn.Module):
    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(width)
        self.c_attn = nn.Linear(width, 3 * width)
        self.c_proj = nn.Linear(width, width)
        self.ln_2 = nn.LayerNorm(width)
        self.c_fc = nn.Linear(width, 4 * width)
        self.mlp_proj = nn.Linear(4 * width, width)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, d)
        b, t, d = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(d, dim=2)
        shape = (b, t, self.heads, d // self.heads)
        q, k, v = (z.view(shape).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(d // self.heads)
        mask = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        att = self.drop(att.masked_fill(~mask, float("-inf")).softmax(dim=-1))
        y = (att @ v).transpose(1, 2).reshape(b, t, d)
        x = x + self.drop(self.c_proj(y))
        return x + self.drop(self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x)))))


class TinyGPT(nn.Module):
    def __init__(
        self, vocab: int = VOCAB, width: int = WIDTH, layers: int = 2, dropout: float = 0.1
    ) -> None:
        super().__init__()
        self.wte = nn.Embedding(vocab, width)
        self.wpe = nn.Embedding(SEQ, width)
        self.h = nn.ModuleList(Block(width, 2, dropout) for _ in range(layers))
        self.ln_f = nn.LayerNorm(width)
        self.lm_head = nn.Linear(width, vocab, bias=False)
        self.lm_head.weight = self.wte.weight  # tied, as GPT-2

    def forward(self, idx: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T, vocab)
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.h:
            x = block(x)
        logits: torch.Tensor = self.lm_head(self.ln_f(x))
        return logits


def make_model(seed: int = 0, dropout: float = 0.1) -> TinyGPT:
    torch.manual_seed(seed)
    return TinyGPT(dropout=dropout)


def make_optimizer(model: nn.Module, lr: float = 3e-3) -> torch.optim.AdamW:
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1, betas=(0.9, 0.95))


def batch(step: int, size: int = 4) -> torch.Tensor:
    """(size, SEQ + 1) token ids from a step-seeded generator (never the global RNG)."""
    generator = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, VOCAB, (size, SEQ + 1), generator=generator)


def loss_of(model: nn.Module, step: int) -> torch.Tensor:
    tokens = batch(step).to(next(model.parameters()).device)
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


def train(
    model: nn.Module,
    steps: int,
    step_fn: Callable[[torch.Tensor], object],
    zero_grad: Callable[[], None],
    start: int = 0,
) -> list[object]:
    """Run `steps` training steps: forward, backward, `step_fn(loss)`, `zero_grad()`."""
    out = []
    model.train()
    for step in range(start, start + steps):
        loss = loss_of(model, step)
        loss.backward()
        out.append(step_fn(loss))
        zero_grad()
    return out


def snapshot(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Every weight and every optimizer state tensor (incl. step counts), cloned."""
    out = {f"param/{n}": p.detach().clone() for n, p in model.named_parameters()}
    names = {id(p): n for n, p in model.named_parameters()}
    for p, state in optimizer.state.items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                out[f"state/{names[id(p)]}/{key}"] = value.detach().clone()
    return out


def assert_bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].dtype == b[key].dtype, key
        assert torch.equal(a[key], b[key]), f"{key} differs"


def init_gloo(out: str, rank: int, world: int) -> None:
    """Join a CPU (gloo) process group through a rendezvous file in `out`, one intra-op thread
    per process (the guard's multi-process tests: 2 processes on a 2-core machine)."""
    from datetime import timedelta

    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{out}/rendezvous",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=60),
    )
