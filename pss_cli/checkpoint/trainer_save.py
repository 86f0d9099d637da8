"""Whether a Hugging Face Trainer `checkpoint-N/` folder is a complete save.

Trainer writes the model weights first, then optimizer.pt, scheduler.pt, rng_state*.pth and
trainer_state.json last (transformers 4.x and 5.x `_save_checkpoint`). A folder caught between
the two has complete weights, so it scans and smooths like any other, but
`trainer.train(resume_from_checkpoint=...)` fails on it (FileNotFoundError: trainer_state.json).
"""

from __future__ import annotations

import re
from pathlib import Path

_TRAINER_FOLDER = re.compile(r"checkpoint-\d+")
TRAINER_STATE = "trainer_state.json"


def incomplete_trainer_save(path: Path) -> str | None:
    """A note when `path` (a checkpoint-N folder, or a file in one) lacks trainer_state.json
    while its run folder's other checkpoint-N folders have one; None otherwise (not a Trainer
    checkpoint, or a run saved without it, e.g. by save_pretrained alone)."""
    folder = path if path.is_dir() else path.parent
    if not _TRAINER_FOLDER.fullmatch(folder.name) or (folder / TRAINER_STATE).exists():
        return None
    try:
        siblings = [
            p
            for p in folder.parent.iterdir()
            if p != folder and p.is_dir() and _TRAINER_FOLDER.fullmatch(p.name)
        ]
    except OSError:
        return None
    if not any((p / TRAINER_STATE).exists() for p in siblings):
        return None
    missing = [
        name
        for name in ("optimizer.pt", "scheduler.pt", TRAINER_STATE)
        if not (folder / name).exists()
    ]
    return (
        f"'{folder.name}' has no {', '.join(missing)}, which the run's other checkpoints have: "
        "Trainer was still writing it, or it was cut short; resume_from_checkpoint fails on it "
        "(its weights are complete): wait for the save to finish, or use the checkpoint before it"
    )
