"""examples/divergence/data.py (the committed corpus, its split and the (seed, step) batch order),
loaded by path: both example folders have a module named `model`, so the divergence folder cannot
simply go on sys.path."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

_PATH = Path(__file__).resolve().parents[1] / "divergence" / "data.py"
_spec = importlib.util.spec_from_file_location("divergence_data", _PATH)
assert _spec is not None and _spec.loader is not None
_data = importlib.util.module_from_spec(_spec)
sys.modules["divergence_data"] = _data
_spec.loader.exec_module(_data)

Corpus = _data.Corpus
load_corpus = _data.load_corpus
train_batch = _data.train_batch
val_batches = _data.val_batches

__all__ = ["Corpus", "load_corpus", "train_batch", "val_batches"]
