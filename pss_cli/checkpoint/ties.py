"""An LM head that transformers ties to the token embedding (`tie_word_embeddings`) is not
stored: safetensors and torch files keep the shared tensor once, under the embedding's name."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

# Names under which transformers ties the LM head to the token embedding, and the token
# embedding names it ties to.
LM_HEAD_NAMES = ("lm_head.weight", "embed_out.weight", "output.weight")
TOKEN_EMBEDDING_HINTS = ("wte", "embed_tokens", "word_embeddings", "tok_embeddings", "embed_in")


# Architectures (config.json "architectures") with an output head over the vocabulary: a
# tie needs one. A bare encoder (BertModel, a sentence-transformers model) has none.
_HEAD_ARCHITECTURES = (
    "LMHead",
    "ForCausalLM",
    "ForMaskedLM",
    "ForConditionalGeneration",
    "ForPreTraining",
    "DoubleHeads",
)


def config_ties_embeddings(folder: Path) -> bool | None:
    """What the model's config.json says about tying (transformers' default, True, when it is
    silent); None when there is no readable config.json. False when the architectures it names
    have no LM head (BertModel: the note said "the output head too" of a model without one)."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        return None
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
        tie = config.get("tie_word_embeddings", True)
        architectures = config.get("architectures")
    except (OSError, ValueError, AttributeError):
        return True
    if isinstance(architectures, list) and architectures:
        names = [a for a in architectures if isinstance(a, str)]
        if names and not any(marker in a for a in names for marker in _HEAD_ARCHITECTURES):
            return False
    return tie is not False


def token_embedding(names: Iterable[str]) -> str | None:
    """The one token embedding among `names` (analysed, unstacked matrices), or None."""
    candidates = [name for name in names if any(hint in name for hint in TOKEN_EMBEDDING_HINTS)]
    return candidates[0] if len(candidates) == 1 else None


def untied_head_stored(stored: Iterable[str]) -> bool:
    return any(
        name == head or name.endswith("." + head) for name in stored for head in LM_HEAD_NAMES
    )


def tied_head_embedding(folder: Path, stored: Iterable[str], analysed: Iterable[str]) -> str | None:
    """The token embedding that is also the LM head, when config.json ties them and no LM head
    is stored; None otherwise (or when there is no config to say so)."""
    if config_ties_embeddings(folder) is not True or untied_head_stored(stored):
        return None
    return token_embedding(analysed)
