"""Generate the tiny sample checkpoints in this folder, deterministically.

    python sample_checkpoints/make_samples.py [OUT_DIR]

A GPT-2-shaped model (HF names, HF Conv1D (in, out) layouts, vocab 512, context 128, width 64,
4 blocks) whose weight matrices get trained-like spectra W = U diag(s) V^T: U, V random
orthogonal, s a power law s_i ~ (i+1)^-alpha with alpha in [0.2, 0.35] plus 3 % noise. For 64
singular values that gives stable ranks of ~9-19 ("healthy"). The "diverged" copy multiplies
sigma_1 of three matrices by 6, so their stable rank 1 + (SR - 1) / 36 falls below ~1.6, the
collapse signature reported by the PSS paper (NOTES.md "The method").
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

SEED = 20260201
VOCAB, CONTEXT, WIDTH, N_BLOCKS = 512, 128, 64, 4
ENTRY_STD = 0.02  # GPT-2's init scale: sets the Frobenius norm, hence the level of s
SPIKE_FACTOR = 6.0
DIVERGED = ("transformer.h.2.mlp.c_fc.weight", "transformer.h.3.mlp.c_fc.weight")
DIVERGED += ("transformer.h.3.attn.c_attn.weight",)
METADATA = {"format": "pt"}
SHARD_NAMES = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")


def spectral_matrix(gen: torch.Generator, m: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(U diag(s) V^T as (m, n) float32, s descending) with a random power-law spectrum."""
    k = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, k, generator=gen, dtype=torch.float64))  # (m, k)
    v, _ = torch.linalg.qr(torch.randn(n, k, generator=gen, dtype=torch.float64))  # (n, k)
    alpha = 0.2 + 0.15 * torch.rand((), generator=gen, dtype=torch.float64)
    ranks = torch.arange(1, k + 1, dtype=torch.float64)
    noise = 1.0 + 0.03 * torch.randn(k, generator=gen, dtype=torch.float64)
    s = (ranks.pow(-alpha) * noise).sort(descending=True).values
    s *= ENTRY_STD * (m * n) ** 0.5 / s.norm()  # ||W||_F = std * sqrt(m n), as at init
    return (u * s) @ v.T, s


def healthy_tensors(gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Every tensor of the tiny GPT-2, float64 (cast by the writers), in HF names."""
    tensors: dict[str, torch.Tensor] = {}

    def matrix(name: str, m: int, n: int) -> None:
        tensors[name], _ = spectral_matrix(gen, m, n)

    def norm(prefix: str) -> None:
        tensors[f"{prefix}.weight"] = 1.0 + 0.05 * torch.randn(WIDTH, generator=gen)
        tensors[f"{prefix}.bias"] = 0.02 * torch.randn(WIDTH, generator=gen)

    def bias(name: str, n: int) -> None:
        tensors[name] = 0.01 * torch.randn(n, generator=gen)

    matrix("transformer.wte.weight", VOCAB, WIDTH)
    matrix("transformer.wpe.weight", CONTEXT, WIDTH)
    for i in range(N_BLOCKS):
        p = f"transformer.h.{i}"
        norm(f"{p}.ln_1")
        matrix(f"{p}.attn.c_attn.weight", WIDTH, 3 * WIDTH)  # Conv1D: (in, out)
        bias(f"{p}.attn.c_attn.bias", 3 * WIDTH)
        matrix(f"{p}.attn.c_proj.weight", WIDTH, WIDTH)
        bias(f"{p}.attn.c_proj.bias", WIDTH)
        norm(f"{p}.ln_2")
        matrix(f"{p}.mlp.c_fc.weight", WIDTH, 4 * WIDTH)
        bias(f"{p}.mlp.c_fc.bias", 4 * WIDTH)
        matrix(f"{p}.mlp.c_proj.weight", 4 * WIDTH, WIDTH)
        bias(f"{p}.mlp.c_proj.bias", WIDTH)
    norm("transformer.ln_f")
    return tensors


def collapse(w: torch.Tensor) -> torch.Tensor:
    """``w`` with sigma_1 multiplied by SPIKE_FACTOR (a rank-1 spike along its top direction)."""
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    s = s.clone()
    s[0] *= SPIKE_FACTOR
    return (u * s) @ vh


def diverged_tensors(healthy: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: collapse(t) if name in DIVERGED else t for name, t in healthy.items()}


def cast(tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {name: t.to(dtype).contiguous() for name, t in tensors.items()}


def write_sharded(folder: Path, tensors: dict[str, torch.Tensor]) -> None:
    """HF sharded layout: blocks 0-1 (and embeddings) in shard 1, the rest in shard 2."""
    folder.mkdir(parents=True, exist_ok=True)
    first = ("transformer.wte.", "transformer.wpe.", "transformer.h.0.", "transformer.h.1.")
    weight_map: dict[str, str] = {}
    parts: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] = ({}, {})
    for name, t in tensors.items():
        shard = 0 if name.startswith(first) else 1
        parts[shard][name] = t
        weight_map[name] = SHARD_NAMES[shard]
    for shard_name, part in zip(SHARD_NAMES, parts, strict=True):
        save(folder / shard_name, part)
    total_size = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    write_json(folder / "model.safetensors.index.json", index)


def trainer_state(global_step: int) -> dict[str, object]:
    """A plausible HF Trainer state: smooth descent, then the grad-norm spike and loss jump
    that a stable-rank collapse comes with (NOTES: grad norm ~60 vs < 10)."""
    history: list[dict[str, object]] = []
    for step in range(10, global_step + 1, 10):
        spike = step >= 90
        history.append(
            {
                "epoch": round(step / 1000, 4),
                "grad_norm": 61.5 if step == 90 else (23.8 if spike else round(2.4 - step / 80, 4)),
                "learning_rate": round(6e-4 * min(1.0, step / 50), 8),
                "loss": round(7.1 if spike else 6.2 - 0.9 * step / 80, 4),
                "step": step,
            }
        )
    return {
        "best_metric": None,
        "best_model_checkpoint": None,
        "epoch": round(global_step / 1000, 4),
        "eval_steps": 500,
        "global_step": global_step,
        "is_hyper_param_search": False,
        "is_local_process_zero": True,
        "is_world_process_zero": True,
        "log_history": history,
        "logging_steps": 10,
        "max_steps": 1000,
        "num_input_tokens_seen": 0,
        "num_train_epochs": 1,
        "save_steps": 100,
        "total_flos": 0.0,
        "train_batch_size": 8,
        "trial_name": None,
        "trial_params": None,
    }


def gpt2_config() -> dict[str, object]:
    return {
        "activation_function": "gelu_new",
        "architectures": ["GPT2LMHeadModel"],
        "bos_token_id": VOCAB - 1,
        "eos_token_id": VOCAB - 1,
        "layer_norm_epsilon": 1e-05,
        "model_type": "gpt2",
        "n_ctx": CONTEXT,
        "n_embd": WIDTH,
        "n_head": 4,
        "n_layer": N_BLOCKS,
        "n_positions": CONTEXT,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
        "vocab_size": VOCAB,
    }


def write_json(path: Path, obj: object) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def save(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # A fresh path every time: NOTES "safetensors facts" (0.8.0rc zero-filled in-place saves).
    path.unlink(missing_ok=True)
    save_file(tensors, str(path), metadata=METADATA)


def main(out_dir: Path | None = None) -> None:
    out = out_dir if out_dir is not None else Path(__file__).resolve().parent
    gen = torch.Generator().manual_seed(SEED)
    healthy = healthy_tensors(gen)
    diverged = diverged_tensors(healthy)
    save(out / "healthy" / "model.safetensors", cast(healthy, torch.float32))
    save(out / "diverged" / "model.safetensors", cast(diverged, torch.float32))
    write_sharded(out / "sharded", cast(healthy, torch.bfloat16))
    trainer = out / "trainer" / "checkpoint-100"
    save(trainer / "model.safetensors", cast(diverged, torch.float32))
    write_json(trainer / "trainer_state.json", trainer_state(100))
    write_json(trainer / "config.json", gpt2_config())


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else None)
