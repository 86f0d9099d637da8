"""The offline corpus and a deterministic, resumable batch order.

corpus.txt is Python 3.11.7's `pydoc_data.topics` (the interactive help text, PSF License; see
CORPUS_LICENSE.md), joined in sorted-key order: 468 kB of English technical prose that anyone can
regenerate, committed so that the experiment does not depend on which Python runs it (the module's
text changes between releases). Tokens are bytes (vocabulary 256).

The batch of optimizer step `s` is a pure function of (seed, s): a run resumed at any step draws
exactly the batches an uninterrupted run would, and a different seed gives a different order of
the same data, with nothing to save but the step.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

CORPUS = Path(__file__).with_name("corpus.txt")
CORPUS_SHA256 = "57908567b1e6a0227b21ab45097e633c5ff9835d608c858f4e6269b8cc6f1461"
VAL_FRACTION = 0.1


@dataclass(frozen=True)
class Corpus:
    train: torch.Tensor  # (N_train,) int64 byte values
    val: torch.Tensor  # (N_val,) int64


def load_corpus(path: Path = CORPUS, expected_sha256: str | None = CORPUS_SHA256) -> Corpus:
    """The corpus split into its first 90 % (train) and last 10 % (validation): a contiguous
    split, so no validation text leaks into training windows."""
    raw = path.read_bytes()
    if expected_sha256 is not None:
        digest = hashlib.sha256(raw).hexdigest()
        if digest != expected_sha256:
            raise ValueError(
                f"{path}: sha256 {digest} differs from the committed corpus {expected_sha256}; "
                "results would not be comparable with docs/EXPERIMENTS.md"
            )
    tokens = torch.frombuffer(bytearray(raw), dtype=torch.uint8).to(torch.int64)
    n_val = int(len(tokens) * VAL_FRACTION)
    return Corpus(train=tokens[:-n_val], val=tokens[-n_val:])


def _windows(
    tokens: torch.Tensor, starts: torch.Tensor, context: int
) -> tuple[torch.Tensor, torch.Tensor]:
    offsets = starts[:, None] + torch.arange(context + 1)[None, :]  # (B, T+1)
    window = tokens[offsets]
    return window[:, :-1], window[:, 1:]


def train_batch(
    corpus: Corpus, seed: int, step: int, batch_size: int, context: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets), each (batch_size, context), for optimizer step `step` (1-based)."""
    # One generator per (seed, step): the order does not depend on how many steps ran before.
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, len(corpus.train) - context - 1, (batch_size,), generator=gen)
    return _windows(corpus.train, starts, context)


def val_batches(
    corpus: Corpus, n_batches: int, batch_size: int, context: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A fixed validation set (the same for every run and seed): evenly spaced windows."""
    n = n_batches * batch_size
    last = len(corpus.val) - context - 1
    starts = torch.linspace(0, last, n).round().to(torch.int64)
    return [
        _windows(corpus.val, starts[i * batch_size : (i + 1) * batch_size], context)
        for i in range(n_batches)
    ]
