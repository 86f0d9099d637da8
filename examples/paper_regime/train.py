"""One training run of the paper-regime GPT, in memory, with every arm of docs/EXPERIMENTS.md v2.

A run is a pure function of its `RunConfig`: the seed sets both the initial weights and the data
order (the batch of step s is a function of (seed, s), examples/divergence/data.py), so arms with
the same seed are paired. Nothing touches the global RNG, so a guarded run whose trigger never
fires is the unguarded run bit for bit.

Arms (`arm`): "baseline" (AdamW, no clipping), "clip" (max total grad norm `grad_clip`), "qknorm"
(QK-LayerNorm), "zloss" (1e-4 log^2 Z), "pss" and "skip" (pss_cli.guard with the paper's trigger;
smooth, or only skip). A run can save HF-like checkpoints (`save_at`) and resume from one, which
the one-shot repair uses with `pss smooth`.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from corpus import Corpus, load_corpus, train_batch, val_batches
from model import ModelConfig, PaperGPT

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "trainer_state.json"


@dataclass(frozen=True)
class RunConfig:
    arm: str = "baseline"
    lr: float = 4e-3
    seed: int = 0  # initial weights AND data order (paired across arms)
    max_steps: int = 300
    warmup_steps: int = 30  # linear warm-up from 0
    decay: bool = False  # False: constant after warm-up; True: cosine to 10 % at max_steps
    batch_size: int = 16
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95  # the paper's and Wortsman et al.'s AdamW betas (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float | None = None  # arm "clip" sets 1.0
    z_loss: float = 0.0  # arm "zloss" sets 1e-4
    bf16: bool = False  # bf16 autocast of the forward pass (a stressor)
    eval_every: int = 25
    eval_batches: int = 8
    spectra_every: int = 50
    # One-shot repair: resume from a checkpoint; skip this many batches of the data order after it.
    resume_from: str | None = None
    data_offset: int = 0
    save_at: tuple[int, ...] = ()
    out_dir: str | None = None
    # Guard arms: the smoothing method of arm "pss" (the primary method is named in the doc).
    guard_method: str = "conv"
    threads: int = 1

    def lr_at(self, step: int, resumed_at: int) -> float:
        lr = self.lr * min(1.0, step / self.warmup_steps) if self.warmup_steps else self.lr
        if self.decay:
            frac = min(
                1.0,
                max(0.0, (step - self.warmup_steps) / max(1, self.max_steps - self.warmup_steps)),
            )
            lr *= 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))
        return lr


@dataclass
class RunLog:
    config: dict[str, Any]
    steps: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)
    grad_norm: list[float] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)  # steps the guard skipped
    triggered: list[int] = field(default_factory=list)  # steps the guard acted (skip/smooth)
    any_rule: list[int] = field(default_factory=list)  # steps any guard rule fired, log-only too
    smoothed: list[int] = field(default_factory=list)  # steps at which it smoothed a matrix
    evals: list[tuple[int, float]] = field(default_factory=list)
    spectra: list[dict[str, Any]] = field(default_factory=list)  # {step, max_logit, sr, sigma1}
    seconds: float = 0.0
    guard_seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {k: _clean(v) for k, v in asdict(self).items()}


def _clean(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, list | tuple):
        return [_clean(v) for v in value]
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    return value


def model_config(cfg: RunConfig, base: ModelConfig) -> ModelConfig:
    return replace(base, qk_norm=base.qk_norm or cfg.arm == "qknorm")


def arm_config(cfg: RunConfig) -> RunConfig:
    """The settings an arm implies (clip 1.0, z-loss 1e-4)."""
    if cfg.arm == "clip" and cfg.grad_clip is None:
        return replace(cfg, grad_clip=1.0)
    if cfg.arm == "zloss" and not cfg.z_loss:
        return replace(cfg, z_loss=1e-4)
    return cfg


def _make_guard(cfg: RunConfig, model: PaperGPT, optimizer: torch.optim.Optimizer) -> Any:
    from guard_arms import guard_config

    from pss_cli.guard import Guard, GuardConfig

    return Guard(model, optimizer, guard_config(GuardConfig, cfg.arm, cfg.guard_method))


@torch.no_grad()
def evaluate(model: PaperGPT, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    model.eval()
    losses = [float(model(x, y)[1]) for x, y in batches]
    model.train()
    return sum(losses) / len(losses)


@torch.no_grad()
def spectra(model: PaperGPT) -> dict[str, dict[str, float]]:
    """Stable rank ||W||_F^2 / sigma_1^2 and sigma_1 of every 2-D weight (embeddings and LM head
    included: a loss above ln 256 means the logits blew up, which lives there)."""
    out: dict[str, dict[str, float]] = {}
    for name, p in model.named_parameters():
        if p.ndim != 2:
            continue
        s = torch.linalg.svdvals(p.detach().double())
        s1 = float(s[0])
        out[name] = {"sigma1": s1, "sr": float((s * s).sum()) / (s1 * s1) if s1 > 0 else math.nan}
    return out


def save_checkpoint(
    folder: Path,
    step: int,
    model: PaperGPT,
    optimizer: torch.optim.Optimizer,
    cfg: RunConfig,
    mcfg: ModelConfig,
) -> None:
    """An HF-Trainer-like folder that `pss smooth` reads and rewrites (weights + optimizer.pt)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file(
        {n: p.detach().contiguous() for n, p in model.named_parameters()},
        str(folder / MODEL_FILE),
        metadata={"format": "pt"},
    )
    torch.save(optimizer.state_dict(), folder / OPTIMIZER_FILE)
    (folder / STATE_FILE).write_text(json.dumps({"global_step": step, "log_history": []}))
    (folder / "config.json").write_text(json.dumps(mcfg.to_json()))
    (folder / "run_config.json").write_text(json.dumps(asdict(cfg)))


def load_checkpoint(folder: Path, model: PaperGPT, optimizer: torch.optim.Optimizer) -> int:
    from safetensors.torch import load_file

    tensors = load_file(str(folder / MODEL_FILE))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(tensors[name])
    if (folder / OPTIMIZER_FILE).is_file():
        optimizer.load_state_dict(torch.load(folder / OPTIMIZER_FILE, weights_only=True))
    return int(json.loads((folder / STATE_FILE).read_text())["global_step"])


def run(cfg: RunConfig, base: ModelConfig | None = None, corpus: Corpus | None = None) -> RunLog:
    base = base if base is not None else ModelConfig()
    cfg = arm_config(cfg)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    corpus = corpus if corpus is not None else load_corpus()
    mcfg = model_config(cfg, base)
    model = PaperGPT(mcfg)
    model.init_weights(torch.Generator().manual_seed(cfg.seed))
    params = [p for _, p in model.named_parameters()]
    optimizer = torch.optim.AdamW(
        params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=cfg.weight_decay
    )
    start = 0
    if cfg.resume_from is not None:
        start = load_checkpoint(Path(cfg.resume_from), model, optimizer)
        for group in optimizer.param_groups:
            group.update(betas=(cfg.beta1, cfg.beta2), weight_decay=cfg.weight_decay)
    guard = _make_guard(cfg, model, optimizer) if cfg.arm in ("pss", "skip") else None
    evals = val_batches(corpus, cfg.eval_batches, cfg.batch_size, mcfg.context)
    probe = evals[0][0][:4]
    log = RunLog(config={**asdict(cfg), "model": mcfg.to_json()})

    def measure(step: int) -> None:
        log.spectra.append(
            {
                "step": step,
                "max_logit": model.max_attention_logit(probe),
                "matrices": spectra(model),
            }
        )

    if start == 0:
        measure(0)
    t0 = time.perf_counter()
    for step in range(start + 1, cfg.max_steps + 1):
        lr = cfg.lr_at(step, start)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = train_batch(corpus, cfg.seed, step + cfg.data_offset, cfg.batch_size, mcfg.context)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
            loss, ce = model(x, y, cfg.z_loss)
        loss.backward()
        if guard is not None:
            tg = time.perf_counter()
            decision = guard.step(loss.detach())
            log.guard_seconds += time.perf_counter() - tg
            gnorm = float(decision.grad_norm)
            if decision.skipped:
                log.skipped.append(step)
            if {"skip", "smooth"} & set(decision.actions):  # the acting rule fired
                log.triggered.append(step)
            if decision.triggered:  # any rule, including the guard's log-only ones
                log.any_rule.append(step)
            if decision.smoothed:
                log.smoothed.append(step)
        else:
            max_norm = cfg.grad_clip if cfg.grad_clip is not None else math.inf
            gnorm = float(torch.nn.utils.clip_grad_norm_(params, max_norm))
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        value = float(ce.detach())
        log.steps.append(step)
        log.loss.append(value)
        log.grad_norm.append(gnorm)
        finite = math.isfinite(value)
        if step % cfg.eval_every == 0 or step == cfg.max_steps or not finite:
            log.evals.append((step, evaluate(model, evals) if finite else math.nan))
        if finite and (step % cfg.spectra_every == 0 or step == cfg.max_steps):
            measure(step)
        if step in cfg.save_at and cfg.out_dir is not None:
            save_checkpoint(
                Path(cfg.out_dir) / f"checkpoint-{step}", step, model, optimizer, cfg, mcfg
            )
        if not finite:
            break  # NaN/Inf: nothing more can happen
    log.seconds = time.perf_counter() - t0
    return log


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="one run; prints the final val loss")
    parser.add_argument("--arm", default="baseline")
    parser.add_argument("--lr", type=float, default=4e-3)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--n-layer", type=int, default=2)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    result = run(
        RunConfig(arm=args.arm, lr=args.lr, max_steps=args.steps, batch_size=args.batch_size),
        ModelConfig(n_layer=args.n_layer, width=args.width),
    )
    print(f"{args.steps} steps {result.seconds:.1f} s; val {result.evals[-1]}", file=sys.stderr)
