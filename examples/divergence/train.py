"""Train the tiny GPT with AdamW and Hugging Face-like checkpoints; resume from any of them.

A checkpoint folder `checkpoint-N/` holds what HF Trainer writes and pss reads:

- `model.safetensors`: the weights (names as in `model.named_parameters()`);
- `optimizer.pt`: `torch.optim.AdamW.state_dict()`, state keyed by integer ids in
  `named_parameters()` order (the HF Trainer layout `pss smooth --optimizer-state` rewrites);
- `trainer_state.json`: `global_step` and `log_history` (`{"step", "loss", "grad_norm",
  "learning_rate"}` every `log_every` steps, `{"step", "eval_loss"}` every `eval_every` steps);
- `config.json`: the model config; `training_args.json`: the run config.

There is no `scheduler.pt` (the LR is a pure function of the step, recomputed on resume) and no
`rng_state.pth` (no dropout, and each batch is a pure function of (seed, step): see data.py).
Besides the checkpoints, a run writes `metrics.jsonl` with every step's loss and grad norm, which
the experiment uses to time explosions to the step.

Usage: `python examples/divergence/train.py --out runs/base` (the experiment's base run), then
`--resume-from runs/base/checkpoint-100 --out runs/resumed --max-steps 250` to continue it.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from data import Corpus, load_corpus, train_batch, val_batches
from model import ModelConfig, TinyGPT

OPTIMIZER_FILE = "optimizer.pt"
MODEL_FILE = "model.safetensors"
STATE_FILE = "trainer_state.json"


@dataclass(frozen=True)
class TrainConfig:
    # Defaults: the experiment's base run (docs/EXPERIMENTS.md), which explodes at step 112.
    lr: float = 0.25
    warmup_steps: int = 100  # linear warm-up from 0, then constant (the paper's regime)
    max_steps: int = 400
    batch_size: int = 16
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.999  # torch AdamW's default (pss's reset arithmetic assumes it)
    grad_clip: float | None = None  # max total grad norm; None = no clipping
    seed: int = 0  # data order
    init_seed: int = 0  # weights (fresh runs only)
    save_every: int = 20  # 0: no checkpoints except --save-final
    save_final: bool = False
    eval_every: int = 25
    eval_batches: int = 8
    log_every: int = 5
    # After a resume: ramp the LR linearly from 0 back to `lr` over this many steps (0: none).
    rewarm_steps: int = 0
    # Stop early once the loss is NaN/Inf (nothing more can happen).
    stop_on_nonfinite: bool = True
    # torch.set_num_threads (0: torch's default). The thread count changes float summation order,
    # so the step at which a run explodes is reproducible only for the same count.
    threads: int = 1

    def lr_at(self, step: int, resumed_at: int | None) -> float:
        lr = self.lr * min(1.0, step / self.warmup_steps) if self.warmup_steps else self.lr
        if resumed_at is not None and self.rewarm_steps:
            lr *= min(1.0, (step - resumed_at) / self.rewarm_steps)
        return lr


@dataclass
class RunResult:
    out_dir: Path
    start_step: int
    last_step: int
    steps: list[int] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)
    evals: list[tuple[int, float]] = field(default_factory=list)
    seconds: float = 0.0
    checkpoints: list[Path] = field(default_factory=list)


def _build_optimizer(model: TinyGPT, cfg: TrainConfig) -> torch.optim.AdamW:
    # One param group, every parameter in named_parameters() order: the ids of the optimizer state
    # then follow that order, as in HF Trainer. (HF exempts biases and norms from weight decay with
    # a second group; one group keeps the experiment's knobs minimal.)
    params = [p for _, p in model.named_parameters()]
    return torch.optim.AdamW(
        params,
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        weight_decay=cfg.weight_decay,
    )


@torch.no_grad()
def evaluate(model: TinyGPT, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    model.eval()
    losses = [float(model(x, y)) for x, y in batches]
    model.train()
    return sum(losses) / len(losses)


def _save_checkpoint(
    out_dir: Path,
    step: int,
    model: TinyGPT,
    optimizer: torch.optim.Optimizer,
    log_history: list[dict[str, Any]],
    model_cfg: ModelConfig,
    cfg: TrainConfig,
) -> Path:
    from safetensors.torch import save_file

    folder = out_dir / f"checkpoint-{step}"
    tmp = out_dir / f".checkpoint-{step}.tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    tensors = {name: p.detach().contiguous() for name, p in model.named_parameters()}
    save_file(tensors, str(tmp / MODEL_FILE), metadata={"format": "pt"})
    torch.save(optimizer.state_dict(), tmp / OPTIMIZER_FILE)
    state = {
        "global_step": step,
        "max_steps": cfg.max_steps,
        "logging_steps": cfg.log_every,
        "eval_steps": cfg.eval_every,
        "save_steps": cfg.save_every,
        "log_history": log_history,
    }
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=2))
    (tmp / "config.json").write_text(json.dumps(model_cfg.to_json(), indent=2))
    (tmp / "training_args.json").write_text(json.dumps(asdict(cfg), indent=2))
    tmp.rename(folder)  # a checkpoint folder is complete or absent
    return folder


def load_checkpoint(
    folder: Path, model: TinyGPT, optimizer: torch.optim.Optimizer
) -> tuple[int, list[dict[str, Any]], bool]:
    """Load weights (strict) and, when present, the optimizer state; returns (global_step,
    log_history, optimizer_restored). A folder without optimizer.pt (`pss smooth
    --optimizer-state drop`) resumes with fresh Adam moments, like HF Trainer does."""
    from safetensors.torch import load_file

    tensors = load_file(str(folder / MODEL_FILE))
    missing = set(dict(model.named_parameters())) ^ set(tensors)
    if missing:
        raise ValueError(f"{folder / MODEL_FILE}: tensors do not match the model: {missing}")
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(tensors[name])
    restored = (folder / OPTIMIZER_FILE).is_file()
    if restored:
        optimizer.load_state_dict(torch.load(folder / OPTIMIZER_FILE, weights_only=True))
    state = json.loads((folder / STATE_FILE).read_text())
    return int(state["global_step"]), list(state["log_history"]), restored


def train(
    out_dir: Path,
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    resume_from: Path | None = None,
    corpus: Corpus | None = None,
    quiet: bool = True,
) -> RunResult:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    corpus = corpus if corpus is not None else load_corpus()
    out_dir.mkdir(parents=True, exist_ok=True)
    model = TinyGPT(model_cfg)
    model.init_weights(torch.Generator().manual_seed(cfg.init_seed))
    optimizer = _build_optimizer(model, cfg)
    log_history: list[dict[str, Any]] = []
    start_step, resumed_at = 0, None
    if resume_from is not None:
        start_step, log_history, _ = load_checkpoint(resume_from, model, optimizer)
        resumed_at = start_step
        # The resumed run's own config wins over the checkpoint's (LR, betas, weight decay).
        for group in optimizer.param_groups:
            group.update(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
    evals = val_batches(corpus, cfg.eval_batches, cfg.batch_size, model_cfg.context)
    result = RunResult(out_dir=out_dir, start_step=start_step, last_step=start_step)
    params = [p for _, p in model.named_parameters()]
    window_losses: list[float] = []
    t0 = time.perf_counter()
    with (out_dir / "metrics.jsonl").open("w") as metrics:
        for step in range(start_step + 1, cfg.max_steps + 1):
            lr = cfg.lr_at(step, resumed_at)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x, y = train_batch(corpus, cfg.seed, step, cfg.batch_size, model_cfg.context)
            loss = model(x, y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            # The total norm before clipping, as HF Trainer logs it; max_norm=inf clips nothing.
            max_norm = cfg.grad_clip if cfg.grad_clip is not None else math.inf
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
            optimizer.step()
            loss_value = float(loss.detach())
            result.steps.append(step)
            result.losses.append(loss_value)
            result.grad_norms.append(grad_norm)
            result.last_step = step
            window_losses.append(loss_value)
            record: dict[str, Any] = {
                "step": step,
                "loss": loss_value,
                "grad_norm": grad_norm,
                "learning_rate": lr,
            }
            if step % cfg.log_every == 0:
                log_history.append(
                    {
                        "step": step,
                        "loss": _finite_or_none(sum(window_losses) / len(window_losses)),
                        "grad_norm": _finite_or_none(grad_norm),
                        "learning_rate": lr,
                    }
                )
                window_losses = []
            finite = math.isfinite(loss_value)
            if step % cfg.eval_every == 0 or step == cfg.max_steps or not finite:
                eval_loss = evaluate(model, evals) if finite else math.nan
                result.evals.append((step, eval_loss))
                record["eval_loss"] = eval_loss
                if step % cfg.eval_every == 0:
                    log_history.append({"step": step, "eval_loss": _finite_or_none(eval_loss)})
            metrics.write(json.dumps({k: _finite_or_none(v) for k, v in record.items()}) + "\n")
            if (cfg.save_every and step % cfg.save_every == 0) or (
                cfg.save_final and step == cfg.max_steps
            ):
                result.checkpoints.append(
                    _save_checkpoint(out_dir, step, model, optimizer, log_history, model_cfg, cfg)
                )
            if not quiet and step % 100 == 0:
                print(
                    f"step {step}: loss {loss_value:.3f} grad_norm {grad_norm:.2f} lr {lr:.2e}",
                    file=sys.stderr,
                )
            if not finite and cfg.stop_on_nonfinite:
                break
    result.seconds = time.perf_counter() - t0
    return result


def _finite_or_none(value: Any) -> Any:
    """JSON has no NaN/Inf (and pss reads trainer_state.json as strict JSON): write null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--resume-from", type=Path)
    defaults = TrainConfig()
    for name, value in asdict(defaults).items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=value)
        elif name == "grad_clip":
            parser.add_argument(flag, type=float, default=value)
        else:
            parser.add_argument(flag, type=type(value), default=value)
    mdefaults = ModelConfig()
    for name, value in asdict(mdefaults).items():
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=value)
    args = vars(parser.parse_args(argv))
    model_cfg = ModelConfig(**{k: args[k] for k in asdict(mdefaults)})
    cfg = replace(defaults, **{k: args[k] for k in asdict(defaults)})
    result = train(args["out"], model_cfg, cfg, resume_from=args["resume_from"], quiet=False)
    print(
        f"{result.last_step - result.start_step} steps in {result.seconds:.1f} s; "
        f"final eval loss {result.evals[-1][1] if result.evals else float('nan'):.4f}",
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
