"""Tiny real training runs (HF Trainer, Lightning) on CPU for the repair-and-resume tests.

Models are built from configs (no hub download); each run trains for real for a few dozen steps
in a few seconds. A run records the learning rate of every optimizer step it takes and the
weights it starts from (after a checkpoint was loaded), so tests can check what a resume used.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

VOCAB, WIDTH, CONTEXT = 64, 32, 32


@dataclass
class RunRecord:
    lrs: list[float] = field(default_factory=list)  # LR of each optimizer step, in order
    steps: list[int] = field(default_factory=list)  # global step at each of those
    start_weights: dict[str, torch.Tensor] = field(default_factory=dict)


def _tokens(n: int = 256) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    # A repeated pattern plus noise: learnable, so the loss moves and the moments fill.
    base = torch.arange(CONTEXT) % 7
    noise = torch.randint(0, VOCAB, (n, CONTEXT), generator=generator)
    keep = torch.rand(n, CONTEXT, generator=generator) < 0.7
    return torch.where(keep, base.expand(n, CONTEXT), noise)


# --- Hugging Face Trainer -------------------------------------------------------------------


def trainer_run(
    output_dir: Path,
    *,
    max_steps: int = 40,
    stop_at: int | None = None,
    save_steps: int = 10,
    save_total_limit: int | None = 2,
    resume_from: Path | None = None,
    learning_rate: float = 1e-2,
) -> RunRecord:
    """Train a 2-layer GPT-2 (32 wide) with AdamW and the linear schedule; optionally stop at a
    step (the schedule still spans ``max_steps``) or resume from a checkpoint folder."""
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    record = RunRecord()
    tokens = _tokens()

    class Data(torch.utils.data.Dataset[dict[str, torch.Tensor]]):
        def __len__(self) -> int:
            return len(tokens)

        def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
            return {"input_ids": tokens[i], "labels": tokens[i]}

    class Record(TrainerCallback):  # type: ignore[misc]
        def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            model = kw["model"]
            record.start_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}

        def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            record.lrs.append(float(kw["optimizer"].param_groups[0]["lr"]))
            record.steps.append(int(state.global_step))

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if stop_at is not None and state.global_step >= stop_at:
                control.should_training_stop = True

    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=WIDTH, n_head=2, vocab_size=VOCAB, n_positions=CONTEXT)
    model = GPT2LMHeadModel(config)
    args = TrainingArguments(
        output_dir=str(output_dir),
        max_steps=max_steps,
        save_steps=save_steps,
        save_total_limit=save_total_limit,
        learning_rate=learning_rate,
        weight_decay=0.01,
        per_device_train_batch_size=8,
        report_to=[],
        use_cpu=True,
        logging_steps=1,
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=Data(), callbacks=[Record()])
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    return record


# --- Lightning --------------------------------------------------------------------------------


def lightning_run(
    root: Path,
    *,
    max_steps: int = 20,
    every_n_steps: int = 10,
    resume_from: Path | None = None,
    learning_rate: float = 1e-2,
) -> RunRecord:
    """A two-layer MLP LightningModule whose hyperparameters include a ``pathlib.Path`` and an
    ``argparse.Namespace`` (common in real scripts), AdamW + a cosine schedule stepped per step;
    ModelCheckpoint writes ``epoch=E-step=S.ckpt`` every ``every_n_steps``."""
    import argparse

    import lightning as L
    from torch import nn

    record = RunRecord()
    data = torch.utils.data.TensorDataset(
        torch.randn(160, 16, generator=torch.Generator().manual_seed(0))
    )

    class Module(L.LightningModule):
        def __init__(self, data_dir: Path, extra: argparse.Namespace, lr: float) -> None:
            super().__init__()
            self.save_hyperparameters()
            self.inp = nn.Linear(16, 32)
            self.hidden = nn.Linear(32, 32)
            self.out = nn.Linear(32, 16)

        def training_step(self, batch: Any, _index: int) -> torch.Tensor:
            (x,) = batch
            y = self.out(torch.relu(self.hidden(torch.relu(self.inp(x)))))
            return (y - x.flip(-1)).pow(2).mean()

        def configure_optimizers(self) -> Any:
            optimizer = torch.optim.AdamW(self.parameters(), lr=self.hparams["lr"])
            schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=200)
            return {
                "optimizer": optimizer,
                "lr_scheduler": {"scheduler": schedule, "interval": "step"},
            }

    class Record(L.Callback):
        def on_train_start(self, trainer: Any, module: Any) -> None:
            record.start_weights = {k: v.detach().clone() for k, v in module.state_dict().items()}

        def on_before_optimizer_step(self, trainer: Any, module: Any, optimizer: Any) -> None:
            record.lrs.append(float(optimizer.param_groups[0]["lr"]))
            record.steps.append(int(trainer.global_step))

    torch.manual_seed(0)
    module = Module(root / "data dir", argparse.Namespace(tag="tiny"), learning_rate)
    checkpoint = L.pytorch.callbacks.ModelCheckpoint(
        dirpath=root / "checkpoints", every_n_train_steps=every_n_steps, save_top_k=-1
    )
    trainer = L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[checkpoint, Record()],
        default_root_dir=root,
    )
    loader = torch.utils.data.DataLoader(data, batch_size=16)
    # Lightning itself loads with weights_only=True: the same plain-data classes must be allowed
    with torch.serialization.safe_globals([type(Path()), argparse.Namespace]):
        trainer.fit(module, loader, ckpt_path=str(resume_from) if resume_from else None)
    return record
