"""Run many `RunConfig`s, at most `workers` at a time (one thread each), caching each result as
JSON under the output folder so that an interrupted experiment resumes where it stopped."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from model import ModelConfig
from train import RunConfig, run


def run_key(cfg: RunConfig, mcfg: ModelConfig) -> str:
    blob = json.dumps([asdict(cfg), asdict(mcfg)], sort_keys=True)
    return f"{cfg.arm}-lr{cfg.lr:g}-s{cfg.seed}-" + hashlib.sha256(blob.encode()).hexdigest()[:10]


def _one(job: tuple[RunConfig, ModelConfig, str]) -> dict[str, Any]:
    cfg, mcfg, path = job
    result = run(cfg, mcfg).to_json()
    Path(path).write_text(json.dumps(result))
    return result


def run_grid(
    jobs: Sequence[tuple[RunConfig, ModelConfig]],
    out: Path,
    workers: int = 2,
    cached_only: bool = False,
) -> list[dict[str, Any]]:
    """The results of `jobs`, in order; with `cached_only`, only the ones already on disk (the
    report of an experiment cut short by its deadline)."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{run_key(c, m)}.json" for c, m in jobs]
    todo = [(c, m, str(p)) for (c, m), p in zip(jobs, paths, strict=True) if not p.is_file()]
    if cached_only:
        return [json.loads(p.read_text()) for p in paths if p.is_file()]
    if todo:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            for _ in pool.imap_unordered(_one, todo):
                pass
    return [json.loads(p.read_text()) for p in paths]
