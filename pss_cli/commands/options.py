"""Option declarations shared by commands (declared once, defaults from pss_cli.config)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from pss_cli.config import OutputFormat, ProductPrecision

CheckpointArg = Annotated[
    Path,
    typer.Argument(
        help="A .safetensors file or index, a .pt/.bin/.pth state dict or Lightning .ckpt, or "
        "a folder: a Hugging Face Trainer checkpoint-N/, a sharded checkpoint, a PyTorch "
        "Distributed Checkpoint (DCP).",
        show_default=False,
        metavar="CHECKPOINT",
    ),
]
IncludeOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--include", metavar="GLOB", help="Only tensors whose name matches this glob (repeatable)."
    ),
]
ExcludeOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--exclude", metavar="GLOB", help="Skip tensors whose name matches this glob (repeatable)."
    ),
]
FormatOpt = Annotated[OutputFormat, typer.Option("--format", "-f", help="Output format on stdout.")]
OutputOpt = Annotated[
    Path | None,
    typer.Option(
        "--output",
        "-o",
        metavar="FILE",
        help="Also write the output to FILE (atomically; not when the command ends in an error).",
    ),
]
DeviceOpt = Annotated[
    str,
    typer.Option(
        "--device", metavar="DEVICE", help="auto, cpu, cuda or cuda:N (auto: CUDA when available)."
    ),
]
SeedOpt = Annotated[
    int, typer.Option("--seed", metavar="INT", help="Seed of the random start blocks.")
]
MinStableRankOpt = Annotated[
    float,
    typer.Option(
        "--min-stable-rank",
        metavar="SR",
        help="A matrix is flagged (scan) and selected (smooth) below this stable rank (lowered "
        "to a quarter of min(m, n) for small matrices).",
    ),
]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar on stderr.")]
AllowPickleTypesOpt = Annotated[
    bool,
    typer.Option(
        "--allow-pickle-types",
        help="Also load pathlib paths and argparse.Namespace from .pt/.ckpt pickles (plain "
        "data that runs no code; off by default). Env: PSS_ALLOW_PICKLE_TYPES=1.",
    ),
]
PrecisionOpt = Annotated[
    ProductPrecision,
    typer.Option(
        "--precision",
        help="Dtype of the Krylov products: auto measures bf16 against fp32 on the device and "
        "uses bf16 where it is clearly faster; values are always refined in fp32.",
    ),
]
