"""End-to-end benchmark of `pss scan` against exact and randomized SVD baselines.

    python benchmarks/bench_scan.py [--workload llama-block|gpt2-small|all] [--repeats N]
                                    [--out FILE.md] [--exact-device cpu|cuda] [--ww-site DIR]

Per workload: the CPU model and the flags that decide the product precision (AVX2, AVX-512,
AVX512_BF16, AMX), the BLAS torch uses, the measured bf16/fp32 GEMM time ratio, pss in each
product precision (in-process and as a whole `pss scan` process, torch import included), exact
svdvals, scipy svds(k=16) (ARPACK), WeightWatcher when importable, torch.svd_lowrank, the read
floor (the checkpoint's bytes from the page cache) and the product floor (pss's products alone
in the chosen precision), and every method's errors against exact.

Each workload is a synthetic safetensors checkpoint written to a temporary folder (deleted at the
end). Every matrix is a Marchenko-Pastur bulk (i.i.d. Gaussian entries scaled 1/sqrt(long side))
plus 0-3 rank-1 spikes. The spike-free matrices are the hard case of docs/DESIGN.md "Numerics":
sigma_2/sigma_1 ~ 0.99+, where few-step subspace iteration underestimates sigma_1 by percents.

Every method runs in its own fresh subprocess (this script with the hidden `--method` flag) so
that its peak RSS (`ru_maxrss` at its end) is not hidden by another method's allocations, and so
that no method profits from another one's warmed-up allocator or thread pool. Process start-up and
imports are not timed; reading the file is (from the page cache: the file was just written).

The reference for every error is the exact fp32 `torch.linalg.svdvals` of the tall orientation
(method `exact`), with the Frobenius norm accumulated in float64 for the stable rank.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from cpu_info import cpu_flags, cpu_name, isa_caps
from safetensors import safe_open
from safetensors.torch import save_file

TOP_K = 16  # pss's default --top-k; every method is compared on these values
SEED = 20240611
# Rows generated per chunk: Gaussian noise is drawn in float32 a few MiB at a time and copied into
# the (possibly BF16) output, so generation needs no full-size float32 temporary per matrix.
CHUNK_ELEMENTS = 2**22
# Spike strengths are chosen so that sigma_1 / bulk edge falls in this range (DESIGN.md: realistic
# weights show outliers a little to a few times above the bulk).
SPIKE_RATIO_RANGE = (1.2, 3.0)
# pss's Krylov block width (pss_cli.core.spectra.DEFAULT_BLOCK_SIZE): the floor uses the same.
FLOOR_BLOCK_SIZE = 32
# The docs/DESIGN.md figures for WeightWatcher 0.7.7 on this CPU, quoted when it cannot be measured.
WW_NOTES_SECONDS = {(4096, 4096): 9.5, (11008, 4096): 14.0, (4096, 11008): 14.0}

# Goals (issue #15; reported, never tuned for). On a CPU with a native bf16 GEMM: in-process
# >= 25x faster than exact, the whole process >= 12x, >= 40x WeightWatcher, >= 5x scipy svds; on
# an AVX2-only CPU >= 15x in-process; everywhere within 1.3x of max(read floor, product floor).
GOAL_SPEEDUP_VS_EXACT_BF16 = 25.0
GOAL_SPEEDUP_VS_EXACT_FP32 = 15.0
GOAL_PROCESS_VS_EXACT = 12.0
GOAL_SPEEDUP_VS_WW = 40.0
GOAL_SPEEDUP_VS_SVDS = 5.0
GOAL_FLOOR_RATIO = 1.3
GOAL_SIGMA_MAX_ERR = 1e-3
GOAL_TOP_K_ERR = 1e-2


# --------------------------------------------------------------------------------------------
# Workloads
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MatrixSpec:
    name: str
    shape: tuple[int, int]  # as stored
    spikes: int  # number of rank-1 outliers above the bulk


@dataclass(frozen=True)
class Workload:
    name: str
    description: str
    dtype: torch.dtype  # storage dtype of every tensor
    matrices: tuple[MatrixSpec, ...]
    vectors: tuple[tuple[str, int, float], ...]  # 1-D tensors: (name, length, centre)


def llama_block() -> Workload:
    prefix = "model.layers.0."
    shapes = [
        ("self_attn.q_proj", (4096, 4096)),
        ("self_attn.k_proj", (4096, 4096)),
        ("self_attn.v_proj", (4096, 4096)),
        ("self_attn.o_proj", (4096, 4096)),
        ("mlp.gate_proj", (11008, 4096)),
        ("mlp.up_proj", (11008, 4096)),
        ("mlp.down_proj", (4096, 11008)),
    ]
    # Three spike-free matrices (the slow, flat-bulk case), one of each large shape among them.
    spikes = [0, 1, 2, 3, 0, 1, 0]
    matrices = tuple(
        MatrixSpec(f"{prefix}{name}.weight", shape, count)
        for (name, shape), count in zip(shapes, spikes, strict=True)
    )
    vectors = (
        (f"{prefix}input_layernorm.weight", 4096, 1.0),
        (f"{prefix}post_attention_layernorm.weight", 4096, 1.0),
    )
    return Workload(
        "llama-block", "one Llama-7B-shaped block, BF16", torch.bfloat16, matrices, vectors
    )


def gpt2_small() -> Workload:
    shapes: list[tuple[str, tuple[int, int]]] = [("wte", (50257, 768)), ("wpe", (1024, 768))]
    vectors: list[tuple[str, int, float]] = []
    for block in range(12):
        p = f"h.{block}."
        # HF GPT-2 stores Conv1D weights as (in, out).
        shapes += [
            (p + "attn.c_attn", (768, 2304)),
            (p + "attn.c_proj", (768, 768)),
            (p + "mlp.c_fc", (768, 3072)),
            (p + "mlp.c_proj", (3072, 768)),
        ]
        vectors += [
            (p + "ln_1.weight", 768, 1.0),
            (p + "ln_1.bias", 768, 0.0),
            (p + "attn.c_attn.bias", 2304, 0.0),
            (p + "attn.c_proj.bias", 768, 0.0),
            (p + "ln_2.weight", 768, 1.0),
            (p + "ln_2.bias", 768, 0.0),
            (p + "mlp.c_fc.bias", 3072, 0.0),
            (p + "mlp.c_proj.bias", 768, 0.0),
        ]
    vectors += [("ln_f.weight", 768, 1.0), ("ln_f.bias", 768, 0.0)]
    # (i + i // 4) % 4 cycles the spike count across blocks, so that every matrix type (c_attn,
    # c_proj, ...) appears with 0, 1, 2 and 3 spikes.
    matrices = tuple(
        MatrixSpec(f"{name}.weight", shape, (i + i // 4) % 4)
        for i, (name, shape) in enumerate(shapes)
    )
    return Workload(
        "gpt2-small", "GPT-2-small-shaped checkpoint, F32", torch.float32, matrices, tuple(vectors)
    )


WORKLOADS: dict[str, Callable[[], Workload]] = {
    "llama-block": llama_block,
    "gpt2-small": gpt2_small,
}


def bulk_edge(shape: tuple[int, int]) -> float:
    """Largest singular value of the bulk: sigma0 (sqrt(m) + sqrt(n)) with sigma0 = 1/sqrt(long)."""
    short, long = sorted(shape)
    return (math.sqrt(short) + math.sqrt(long)) / math.sqrt(long)


def spike_strength(ratio: float, shape: tuple[int, int]) -> float:
    """Strength theta of a rank-1 spike theta u v^T whose outlier lands at ratio x the bulk edge.

    Benaych-Georges & Nadakuditi (2012): for X with i.i.d. entries of variance 1/long and aspect
    c = short/long, X + t u v^T has an outlier at sqrt((1 + t^2)(c + t^2)) / t once t > c^(1/4)
    (below that threshold the spike hides in the bulk). Solved for t by bisection; the function is
    increasing above the threshold. Our entries already have variance 1/long, so theta = t.
    """
    short, long = sorted(shape)
    c = short / long
    target = ratio * (1 + math.sqrt(c))

    def outlier(t: float) -> float:
        return math.sqrt((1 + t * t) * (c + t * t)) / t

    lo = hi = c**0.25
    while outlier(hi) < target:
        hi *= 2
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if outlier(mid) < target else (lo, mid)
    return (lo + hi) / 2


def build_matrix(spec: MatrixSpec, dtype: torch.dtype, generator: torch.Generator) -> torch.Tensor:
    rows, cols = spec.shape
    scale = 1.0 / math.sqrt(max(rows, cols))
    low, high = SPIKE_RATIO_RANGE
    draws = torch.rand(spec.spikes, generator=generator, dtype=torch.float64)
    ratios = sorted((low + (high - low) * draws).tolist(), reverse=True)
    thetas = torch.tensor([spike_strength(r, spec.shape) for r in ratios], dtype=torch.float32)
    # Orthonormal spike directions, so that the outliers do not interact.
    u = torch.linalg.qr(torch.randn(rows, spec.spikes, generator=generator)).Q * thetas
    v = torch.linalg.qr(torch.randn(cols, spec.spikes, generator=generator)).Q
    out = torch.empty(rows, cols, dtype=dtype)
    step = max(1, CHUNK_ELEMENTS // cols)
    for r0 in range(0, rows, step):
        r1 = min(rows, r0 + step)
        chunk = torch.randn(r1 - r0, cols, generator=generator).mul_(scale)
        if spec.spikes:
            chunk.addmm_(u[r0:r1], v.mT)
        out[r0:r1].copy_(chunk)
    return out


def write_checkpoint(workload: Workload, path: Path) -> None:
    generator = torch.Generator().manual_seed(SEED)
    tensors: dict[str, torch.Tensor] = {}
    for spec in workload.matrices:
        tensors[spec.name] = build_matrix(spec, workload.dtype, generator)
    for name, length, centre in workload.vectors:
        values = centre + 0.02 * torch.randn(length, generator=generator)
        tensors[name] = values.to(workload.dtype)
    save_file(tensors, str(path))


# --------------------------------------------------------------------------------------------
# Methods (each runs inside its own subprocess; see `run_method`)
# --------------------------------------------------------------------------------------------

MatrixResult = dict[str, object]  # top (list[float]), sigma_max, stable_rank, ...


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _tall(a: torch.Tensor) -> torch.Tensor:
    # LAPACK svdvals was 2.5-3.5x slower on a wide matrix than on its transpose (docs/DESIGN.md).
    return a if a.shape[0] >= a.shape[1] else a.mT


def _frobenius_sq_float64(w: torch.Tensor) -> float:
    """||W||_F^2 accumulated in float64, a few rows at a time (no full float64 copy in RSS)."""
    step = max(1, CHUNK_ELEMENTS // w.shape[1])
    total = 0.0
    for r0 in range(0, w.shape[0], step):
        total += float(w[r0 : r0 + step].double().square().sum())
    return total


def method_exact(args: argparse.Namespace, names: list[str]) -> tuple[list[float], dict]:
    device = torch.device(args.exact_device)
    times, spectra = [], {}
    for _ in range(args.repeats):
        spectra = {}
        _sync(device)
        t0 = time.perf_counter()
        with safe_open(args.checkpoint, framework="pt", device="cpu") as f:
            for name in names:
                a = f.get_tensor(name).to(device=device, dtype=torch.float32)
                spectra[name] = torch.linalg.svdvals(_tall(a)).cpu()
        _sync(device)
        times.append(time.perf_counter() - t0)
    results = {}
    with safe_open(args.checkpoint, framework="pt", device="cpu") as f:
        for name in names:
            s = spectra[name].double()
            results[name] = {
                "top": s[:TOP_K].tolist(),
                "sigma_max": float(s[0]),
                # What a user of the exact method gets: sum of the fp32 values squared.
                "stable_rank": float(s.square().sum() / s[0] ** 2),
                # Not timed: the float64 Frobenius norm of the stored matrix, the reference's.
                "frobenius_sq_ref": _frobenius_sq_float64(f.get_tensor(name)),
            }
    return times, results


def method_pss(args: argparse.Namespace, names: list[str]) -> tuple[list[float], dict]:
    from pss_cli.config import ProductPrecision, ScanConfig
    from pss_cli.pipeline import scan_checkpoint

    precision = ProductPrecision(args.precision or "auto")
    config = ScanConfig(precision=precision)
    if args.pss_device != "auto":
        config = ScanConfig(device=args.pss_device, precision=precision)
    times, report = [], None
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        report = scan_checkpoint(Path(args.checkpoint), config, None)
        times.append(time.perf_counter() - t0)
    assert report is not None
    results = {
        layer.name: {
            "top": list(layer.top_singular_values),
            "sigma_max": layer.sigma_max,
            "stable_rank": layer.stable_rank,
            "iterations": layer.iterations,
            "solver": layer.solver,
        }
        for layer in report.layers
    }
    results["__report__"] = {
        "device": report.device,
        "timings": report.timings,
        "products": report.settings.products,
    }
    return times, results


def method_process(args: argparse.Namespace, names: list[str]) -> tuple[list[float], dict]:
    """The whole `pss scan` command as a user runs it: interpreter start, torch and pss import,
    the measurement of --precision auto, the scan and the JSON output."""
    import os

    command = [sys.executable, "-m", "pss_cli", "scan", args.checkpoint, "-f", "json", "-q"]
    command += ["--precision", args.precision or "auto"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    times, text = [], ""
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
        times.append(time.perf_counter() - t0)
        text = done.stdout
    report = json.loads(text)
    results: dict[str, object] = {
        layer["name"]: {
            "top": layer["top_singular_values"],
            "sigma_max": layer["sigma_max"],
            "stable_rank": layer["stable_rank"],
        }
        for layer in report["layers"]
    }
    # The part of that process no scan can shorten: starting Python and importing what `pss
    # scan` imports before it reads a byte (torch, safetensors, pss). On the Intel Xeon of
    # docs/BENCHMARKS.md `import torch` alone took 1.2 s, most of the 12x goal's time.
    startup = [sys.executable, "-c", "import torch, pss_cli.app, pss_cli.pipeline"]
    imports = []
    for _ in range(max(1, args.repeats)):
        t0 = time.perf_counter()
        subprocess.run(startup, capture_output=True, env=env, check=True)
        imports.append(time.perf_counter() - t0)
    results["__import_seconds__"] = statistics.median(imports)
    return times, results


def method_svds(args: argparse.Namespace, names: list[str]) -> tuple[list[float], dict]:
    """scipy.sparse.linalg.svds(k=16), ARPACK (its default solver), on the fp32 matrix."""
    import numpy as np
    from scipy.sparse.linalg import svds

    times, results = [], {}
    for _ in range(args.repeats):
        results = {}
        t0 = time.perf_counter()
        with safe_open(args.checkpoint, framework="pt", device="cpu") as f:
            for name in names:
                a = _tall(f.get_tensor(name).to(torch.float32)).numpy()
                s = np.sort(svds(a, k=TOP_K, solver="arpack", return_singular_vectors=False))
                s = s[::-1].astype(np.float64)
                frobenius_sq = float(np.linalg.norm(a)) ** 2
                results[name] = {
                    "top": s.tolist(),
                    "sigma_max": float(s[0]),
                    "stable_rank": frobenius_sq / float(s[0]) ** 2,
                }
        times.append(time.perf_counter() - t0)
    return times, results


def method_read(args: argparse.Namespace, names: list[str]) -> tuple[list[float], dict]:
    """The read floor: every byte of the checkpoint into one reused buffer (page cache)."""
    size = Path(args.checkpoint).stat().st_size
    buffer = bytearray(16 * 2**20)
    view = memoryview(buffer)
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        with open(args.checkpoint, "rb", buffering=0) as handle:
            done = 0
            while done < size:
                got = handle.readinto(view)
                if not got:
                    break
                done += got
        times.append(time.perf_counter() - t0)
    return times, {}


def method_lowrank(args: argparse.Namespace, names: list[str]) -> tuple[list[float], dict]:
    q, niter = (int(x) for x in args.lowrank.split(","))
    device = torch.device(args.compute_device)
    times, results = [], {}
    for _ in range(args.repeats):
        torch.manual_seed(SEED)  # svd_lowrank draws its test matrix from the global generator
        results = {}
        _sync(device)
        t0 = time.perf_counter()
        with safe_open(args.checkpoint, framework="pt", device="cpu") as f:
            for name in names:
                a = _tall(f.get_tensor(name).to(device=device, dtype=torch.float32))
                _, s, _ = torch.svd_lowrank(a, q=q, niter=niter)
                # The stable rank needs ||A||_F as well; fp32 is what a user would write.
                frobenius_sq = float(torch.linalg.vector_norm(a)) ** 2
                results[name] = (s[:TOP_K].cpu(), frobenius_sq)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times, {
        name: {
            "top": s.double().tolist(),
            "sigma_max": float(s[0]),
            "stable_rank": fro / float(s[0]) ** 2,
        }
        for name, (s, fro) in results.items()
    }


def method_floor(args: argparse.Namespace, names: list[str]) -> tuple[list[float], dict]:
    """Only the products pss does: per matrix, `iterations` pairs A V, A^T U of width 32 through
    pss's own `Products` (pss_cli.core.mixed_precision), with the blocks laid out as pss's QR
    hands them over (column-major: `_qr_layout`); no orthogonalisation, no Ritz values, no norm
    or finiteness checks. fp32: each matrix is first converted into a preallocated float32
    buffer, as the scan's loader does for a BF16 checkpoint. bf16: the products run on the
    stored bf16 values (A^T U as (U^T A)^T, the Products path).

    The layout matters: with a row-major U, (U^T A)^T took 18.3 ms instead of 11.1 ms on an
    11008 x 4096 bf16 matrix here (Intel Xeon with AMX, one thread): oneDNN reorders a
    transposed left operand. An earlier floor used that layout and came out slower than pss's
    own products, flattering pss's ratio to it."""
    from pss_cli.core.mixed_precision import Products

    iterations: dict[str, int] = json.loads(Path(args.iterations).read_text())
    device = torch.device(args.compute_device)
    low = args.precision == "bf16"
    generator = torch.Generator().manual_seed(SEED)
    sources: dict[str, torch.Tensor] = {}
    buffers: dict[tuple[int, ...], torch.Tensor] = {}  # fp32 conversion buffers, by shape
    blocks: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = {}
    with safe_open(args.checkpoint, framework="pt", device="cpu") as f:
        for name in names:
            # clone(): make the stored bytes resident, so the timed copy is a pure conversion.
            source = _tall(f.get_tensor(name).clone())
            if low:
                # Contiguous in the tall orientation, as the scan's loader lays a batch out: a
                # wide matrix's transposed view took 0.5 s per product here.
                source = source.to(device, torch.bfloat16).contiguous()
            sources[name] = source
            shape = tuple(source.shape)
            if shape not in blocks:
                if not low:
                    buffers[shape] = torch.empty(shape, dtype=torch.float32, device=device)
                m, n = shape
                blocks[shape] = (_qr_layout(n, generator, device), _qr_layout(m, generator, device))

    def products(share: list[str]) -> None:
        # Each thread of `_best_schedule` needs buffers of its own.
        own = {shape: torch.empty_like(buffer) for shape, buffer in buffers.items()}
        for name in share:
            source = sources[name]
            shape = tuple(source.shape)
            v, u = blocks[shape]
            if low:
                ops = Products(source.unsqueeze(0), low=True)
            else:
                a = own[shape]
                a.copy_(source)
                ops = Products(a.unsqueeze(0), low=False)
            for _ in range(iterations.get(name, 0)):
                # Results are discarded: only the products' time is the floor.
                ops.forward(v)
                ops.adjoint(u)

    return _best_schedule(args, names, sources, iterations, products, device)


def _qr_layout(rows: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """A (1, rows, 32) float32 Gaussian block, column-major like the Q of pss's batched_qr
    (pss_cli.core.lapack), so that its transpose is contiguous as in pss's products."""
    block = torch.randn(1, FLOOR_BLOCK_SIZE, rows, generator=generator)
    return block.to(device).mT


def _best_schedule(
    args: argparse.Namespace,
    names: list[str],
    sources: dict[str, torch.Tensor],
    iterations: dict[str, int],
    products: Callable[[list[str]], None],
    device: torch.device,
) -> tuple[list[float], dict]:
    """Time `products` over every matrix, per repeat the faster of two schedules: one after
    another on all of torch's threads, or in two threads at once on half of them each (matrices
    dealt largest work first to the less loaded thread), which is how pss solves a CPU scan's
    batches (pss_cli/pipeline/solve.py). The floor is the best either way, never the slower."""
    threads = torch.get_num_threads()
    work = {name: sources[name].numel() * iterations.get(name, 0) for name in names}
    shares: list[list[str]] = [[], []]
    loads = [0, 0]
    for name in sorted(names, key=lambda x: -work[x]):
        lighter = loads.index(min(loads))
        shares[lighter].append(name)
        loads[lighter] += work[name]

    def half(share: list[str]) -> None:
        torch.set_num_threads(max(1, threads // 2))
        products(share)

    times, chosen = [], []
    for _ in range(args.repeats):
        _sync(device)
        t0 = time.perf_counter()
        products(names)
        _sync(device)
        in_turn = time.perf_counter() - t0
        at_once = math.inf
        if device.type == "cpu" and threads >= 2:
            t0 = time.perf_counter()
            with ThreadPoolExecutor(2) as pool:
                list(pool.map(half, shares))
            at_once = time.perf_counter() - t0
            torch.set_num_threads(threads)
        times.append(min(in_turn, at_once))
        chosen.append("two at once" if at_once < in_turn else "in turn")
    return times, {"__schedule__": chosen}


def method_weightwatcher(args: argparse.Namespace, names: list[str]) -> tuple[list[float], dict]:
    if args.ww_site:
        sys.path.append(args.ww_site)  # appended: the main environment's packages win
    import logging

    import weightwatcher  # type: ignore[import-not-found]

    logging.getLogger("weightwatcher").setLevel(logging.WARNING)
    times, frame = [], None
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        # WeightWatcher analyses a model, not a file: wrap every matrix in a bias-free Linear
        # (built on the meta device, so no random init is paid for and then thrown away).
        layers = torch.nn.ModuleList()
        with safe_open(args.checkpoint, framework="pt", device="cpu") as f:
            for name in names:
                w = f.get_tensor(name).to(torch.float32)
                layer = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device="meta")
                layer.weight = torch.nn.Parameter(w, requires_grad=False)
                layers.append(layer)
        frame = weightwatcher.WeightWatcher(model=layers).analyze()
        times.append(time.perf_counter() - t0)
    assert frame is not None
    results: dict[str, MatrixResult] = {}
    for _, row in frame.iterrows():
        index = int(str(row["name"]))
        results[names[index]] = {
            "top": [],  # analyze() reports sigma_max and the stable rank, not the top-k
            "sigma_max": float(row["sv_max"]),
            "stable_rank": float(row["stable_rank"]),
        }
    return times, results


def method_baseline(args: argparse.Namespace, names: list[str]) -> tuple[list[float], dict]:
    """Peak RSS of the interpreter with torch, safetensors and pss imported, doing nothing."""
    import pss_cli.pipeline  # noqa: F401 - imported for its memory footprint

    return [], {}


METHODS: dict[str, Callable[[argparse.Namespace, list[str]], tuple[list[float], dict]]] = {
    "exact": method_exact,
    "pss": method_pss,
    "lowrank": method_lowrank,
    "floor": method_floor,
    "process": method_process,
    "svds": method_svds,
    "read": method_read,
    "weightwatcher": method_weightwatcher,
    "baseline": method_baseline,
}


def run_method(args: argparse.Namespace) -> None:
    """Subprocess entry point: run one method, write times, values and peak RSS as JSON."""
    names = json.loads(Path(args.manifest).read_text())
    times, results = METHODS[args.method](args, names)
    payload = {
        "times": times,
        "results": results,
        # Linux reports ru_maxrss in KiB.
        "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "threads": torch.get_num_threads(),
    }
    Path(args.result).write_text(json.dumps(payload))


# --------------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------------


@dataclass
class Row:
    method: str
    device: str
    seconds: float | None
    runs: int
    spread: str  # min-max over the runs: the machine is shared and noisy
    speedup: float | None
    err_sigma: float | None
    err_top: float | None
    err_sr: float | None
    rss_mib: float | None


def spawn(
    method: str,
    workdir: Path,
    checkpoint: Path,
    repeats: int,
    options: argparse.Namespace,
    extra: Sequence[str] = (),
) -> dict | None:
    result = workdir / f"{method}-{len(list(workdir.glob('*.json')))}.json"
    log = result.with_suffix(".log")  # one log per run: the lowrank variants share a method
    command = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--method",
        method,
        "--checkpoint",
        str(checkpoint),
        "--manifest",
        str(workdir / "manifest.txt"),
        "--result",
        str(result),
        "--repeats",
        str(repeats),
        "--exact-device",
        options.exact_device,
        "--pss-device",
        options.pss_device,
        "--compute-device",
        options.compute_device,
        *extra,
    ]
    if options.ww_site:
        command += ["--ww-site", options.ww_site]
    with log.open("w") as handle:
        code = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT).returncode
    if code != 0:
        tail = log.read_text().strip().splitlines()[-3:]
        print(f"  [{method} failed with exit code {code}: {' | '.join(tail)}]", flush=True)
        return None
    return json.loads(result.read_text())


def weightwatcher_available(options: argparse.Namespace) -> bool:
    code = "import sys\n"
    if options.ww_site:
        code += f"sys.path.append({options.ww_site!r})\n"
    code += "import weightwatcher\n"
    probe = subprocess.run([sys.executable, "-c", code], capture_output=True)
    return probe.returncode == 0


def relative(value: float, reference: float) -> float:
    return abs(value - reference) / abs(reference)


def errors(
    results: dict, reference: dict, names: list[str]
) -> tuple[float | None, float | None, float | None, dict[str, tuple[float, float, float]]]:
    """Max relative errors of sigma_max, of each top-k value, and of the stable rank."""
    per: dict[str, tuple[float, float, float]] = {}
    for name in names:
        if name not in results:
            continue
        got, ref = results[name], reference[name]
        ref_top = ref["top"]
        ref_sr = ref["frobenius_sq_ref"] / ref_top[0] ** 2
        top = got["top"]
        e_top = max(relative(a, b) for a, b in zip(top, ref_top, strict=True)) if top else math.nan
        per[name] = (
            relative(got["sigma_max"], ref_top[0]),
            e_top,
            relative(got["stable_rank"], ref_sr),
        )
    if not per:
        return None, None, None, per

    def worst(i: int) -> float | None:
        values = [p[i] for p in per.values() if not math.isnan(p[i])]
        return max(values) if values else None

    return worst(0), worst(1), worst(2), per


def median(times: list[float]) -> float:
    return statistics.median(times)


def spread(times: list[float]) -> str:
    return f"{fmt_seconds(min(times))}-{fmt_seconds(max(times))}" if len(times) > 1 else "-"


def fmt_seconds(t: float | None) -> str:
    if t is None:
        return "-"
    return f"{t:.1f}" if t >= 10 else f"{t:.2f}" if t >= 1 else f"{t:.3f}"


def fmt_err(e: float | None) -> str:
    return "-" if e is None else "0" if e == 0 else f"{e:.1e}"


def fmt_x(x: float | None) -> str:
    return "-" if x is None else f"{x:.1f}x" if x < 100 else f"{x:.0f}x"


def md_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), rule, *(line(r) for r in rows)])


def bench_workload(workload: Workload, options: argparse.Namespace) -> str:
    names = [spec.name for spec in workload.matrices]
    params = sum(math.prod(s.shape) for s in workload.matrices) + sum(
        n for _, n, _ in workload.vectors
    )
    fast = options.repeats or 3
    slow = options.repeats or 1
    out: list[str] = []

    def say(text: str) -> None:
        print(text, flush=True)
        out.append(text)

    with tempfile.TemporaryDirectory(prefix=f"pss-bench-{workload.name}-") as tmp:
        workdir = Path(tmp)
        checkpoint = workdir / "model.safetensors"
        t0 = time.perf_counter()
        write_checkpoint(workload, checkpoint)
        print(
            f"[{workload.name}] wrote {params / 1e6:.1f}M parameters "
            f"({checkpoint.stat().st_size / 2**20:.0f} MiB) in {time.perf_counter() - t0:.1f} s",
            flush=True,
        )
        (workdir / "manifest.txt").write_text(json.dumps(names))

        def progress(label: str) -> None:
            print(f"[{workload.name}] running {label} ...", flush=True)

        progress("exact svdvals")
        exact = spawn("exact", workdir, checkpoint, slow, options)
        if exact is None:
            raise SystemExit("the exact baseline failed: no reference, no benchmark")
        reference = exact["results"]
        exact_s = median(exact["times"])

        rows: list[Row] = []

        def add(
            label: str, device: str, run: dict | None, top_applies: bool = True
        ) -> float | None:
            if run is None:
                rows.append(Row(label, device, None, 0, "-", None, None, None, None, None))
                return None
            seconds = median(run["times"])
            e_sigma, e_top, e_sr, _ = errors(run["results"], reference, names)
            rows.append(
                Row(
                    label,
                    device,
                    seconds,
                    len(run["times"]),
                    spread(run["times"]),
                    exact_s / seconds,
                    e_sigma,
                    e_top if top_applies else None,
                    e_sr,
                    run["rss_mib"],
                )
            )
            return seconds

        pss_runs: dict[str, dict] = {}
        pss_seconds: dict[str, float | None] = {}
        auto = choose_auto(options)
        # Where `auto` picks fp32 (bf16 GEMMs not at least BF16_MIN_SPEEDUP faster; on an
        # AVX2-only CPU they are emulated, 40-300x slower, and pss's bf16 run and its floor took
        # minutes each), those two are skipped: their accuracy is the test suite's business on
        # every machine. --bf16 always measures them anyway.
        precisions = (
            ("fp32", "bf16") if options.bf16 == "always" or auto[0] == "bf16" else ("fp32",)
        )
        for precision in precisions:
            progress(f"pss scan --precision {precision}")
            run = spawn("pss", workdir, checkpoint, fast, options, ["--precision", precision])
            if run is None:
                raise SystemExit(f"pss scan --precision {precision} failed")
            pss_runs[precision] = run
            pss_seconds[precision] = add(
                f"pss scan (library, --precision {precision})",
                run["results"]["__report__"]["device"],
                run,
            )
        progress("pss scan as a process (--precision auto)")
        process = spawn("process", workdir, checkpoint, fast, options, ["--precision", "auto"])
        process_s = add("`pss scan` whole process (auto, torch import incl.)", "auto", process)
        add("exact fp32 svdvals (reference)", options.exact_device, exact)

        floors: dict[str, float | None] = {}
        for precision, run in pss_runs.items():
            progress(f"pss product floor ({precision})")
            iterations = {n: int(run["results"][n]["iterations"]) for n in names}
            iterations_file = workdir / f"iterations-{precision}.txt"
            iterations_file.write_text(json.dumps(iterations))
            extra = ["--iterations", str(iterations_file), "--precision", precision]
            floor = spawn("floor", workdir, checkpoint, fast, options, extra)
            floors[precision] = None
            if floor is not None:
                floors[precision] = median(floor["times"])
                label = (
                    "product floor fp32 (fp32 copy + A@V, A^T@U)"
                    if precision == "fp32"
                    else "product floor bf16 (bf16 A@V, (U^T A)^T)"
                )
                schedules = floor["results"].get("__schedule__") or []
                if schedules:  # the faster of one after another and two at once, per repeat
                    label += f", {statistics.mode(schedules)}"
                add(label, options.compute_device, floor)
        progress("read floor")
        read = spawn("read", workdir, checkpoint, fast, options)
        read_s = add("read floor (file bytes from the page cache)", "cpu", read)

        progress("scipy svds(k=16) ARPACK")
        svds_run = spawn("svds", workdir, checkpoint, slow, options)
        svds_s = add("scipy.sparse.linalg.svds k=16 (ARPACK)", "cpu", svds_run)

        for q, niter in ((32, 4),):
            progress(f"svd_lowrank q={q} niter={niter}")
            extra = ["--lowrank", f"{q},{niter}"]
            run = spawn("lowrank", workdir, checkpoint, fast, options, extra)
            add(f"torch.svd_lowrank q={q} niter={niter}", options.compute_device, run)

        ww_s: float | None = None
        ww_note = ""
        if weightwatcher_available(options):
            progress("WeightWatcher analyze()")
            run = spawn("weightwatcher", workdir, checkpoint, slow, options)
            ww_s = add("WeightWatcher 0.7.7 analyze()", "cpu", run, top_applies=False)
            if run is not None:
                missing = [n for n in names if n not in run["results"]]
                if missing:
                    ww_note = f"WeightWatcher skipped {len(missing)} matrices: {', '.join(missing)}"
        else:
            ww_note = "WeightWatcher: not importable here: NOT MEASURED."
        progress("import-only baseline")
        baseline = spawn("baseline", workdir, checkpoint, 0, options)

    # ---- summary table ----
    say(f"\n### {workload.name}: {workload.description}\n")
    say(
        f"{len(names)} matrices, {params / 1e6:.1f}M parameters; "
        f"spikes per matrix: {[s.spikes for s in workload.matrices]}.\n"
    )
    headers = [
        "Method",
        "Device",
        "Wall s (median)",
        "Runs",
        "Min-max s",
        "Speed-up vs exact",
        "sigma_max max rel err",
        "top-16 max rel err",
        "stable-rank max rel err",
        "Peak RSS MiB",
    ]
    table = [
        [
            r.method,
            r.device,
            fmt_seconds(r.seconds),
            str(r.runs),
            r.spread,
            fmt_x(r.speedup),
            fmt_err(r.err_sigma),
            fmt_err(r.err_top),
            fmt_err(r.err_sr),
            "-" if r.rss_mib is None else f"{r.rss_mib:.0f}",
        ]
        for r in rows
    ]
    say(md_table(headers, table))
    notes = []
    if baseline is not None:
        notes.append(
            "Peak RSS of a process that only imports torch and pss: "
            f"{baseline['rss_mib']:.0f} MiB; "
            f"torch threads: {baseline['threads']}."
        )
    if ww_note:
        notes.append(ww_note)
    for precision, run in pss_runs.items():
        timings = run["results"]["__report__"]["timings"]
        notes.append(
            f"pss --precision {precision} report timings (last run): total "
            f"{timings['total_seconds']:.3f} s, solve {timings['compute_seconds']:.3f} s, "
            f"read + convert (loader thread, overlapping) {timings['read_seconds']:.3f} s."
        )
    notes.append(
        f"--precision auto here: bf16/fp32 time ratio {auto[1]:.3f} (calibration product) -> "
        f"{auto[0]} products."
    )
    if "bf16" not in pss_runs:
        speed = (
            f"{auto[1]:.0f}x slower than fp32"
            if auto[1] >= 1.0
            else f"only {1.0 / auto[1]:.2f}x faster than fp32, so `auto` keeps fp32"
        )
        notes.append(
            f"pss --precision bf16 and its product floor: not measured (bf16 GEMMs {speed} "
            "here; `--bf16 always` measures them)."
        )
    say("\n" + "\n".join(f"- {n}" for n in notes))

    # ---- per-matrix detail of pss, grouped over blocks ----
    chosen = auto[0] if auto[0] in pss_runs else "fp32"
    pss = pss_runs[chosen]
    _, _, _, per = errors(pss["results"], reference, names)
    groups: dict[tuple[str, tuple[int, int], int], list[str]] = {}
    for spec in workload.matrices:
        pattern = ".".join("*" if part.isdigit() else part for part in spec.name.split("."))
        groups.setdefault((pattern, spec.shape, spec.spikes), []).append(spec.name)
    detail = []
    for (pattern, shape, spikes), members in groups.items():
        ref = [reference[n]["top"] for n in members]
        its = [int(pss["results"][n]["iterations"]) for n in members]
        solvers = sorted({str(pss["results"][n]["solver"]) for n in members})
        ratio_edge = [r[0] / bulk_edge(shape) for r in ref]
        gap = [r[1] / r[0] for r in ref]
        detail.append(
            [
                pattern,
                f"{shape[0]}x{shape[1]}",
                str(len(members)),
                str(spikes),
                f"{min(ratio_edge):.2f}-{max(ratio_edge):.2f}",
                f"{max(gap):.4f}",
                "/".join(solvers),
                f"{min(its)}-{max(its)}" if min(its) != max(its) else str(its[0]),
                fmt_err(max(per[n][0] for n in members)),
                fmt_err(max(per[n][1] for n in members)),
                fmt_err(max(per[n][2] for n in members)),
            ]
        )
    say(f"\npss --precision {chosen} per matrix (grouped over blocks; errors: group maximum):\n")
    say(
        md_table(
            [
                "Tensor",
                "Shape",
                "Count",
                "Spikes",
                "sigma_1/edge",
                "max sigma_2/sigma_1",
                "Solver",
                "Iterations",
                "sigma_max err",
                "top-16 err",
                "SR err",
            ],
            detail,
        )
    )

    # ---- goals ----
    def verdict(ok: bool) -> str:
        return "PASS" if ok else "FAIL"

    goals = []
    pss_s = pss_seconds[chosen]
    assert pss_s is not None
    native = chosen == "bf16"
    speedup = exact_s / pss_s
    target = GOAL_SPEEDUP_VS_EXACT_BF16 if native else GOAL_SPEEDUP_VS_EXACT_FP32
    goals.append(
        f"{verdict(speedup >= target)} pss ({chosen} products, in-process) >= {target:.0f}x "
        f"faster than exact svdvals: {speedup:.1f}x"
    )
    if process_s is not None:
        ratio = exact_s / process_s
        startup = process["results"].get("__import_seconds__") if process else None
        goals.append(
            f"{verdict(ratio >= GOAL_PROCESS_VS_EXACT)} whole `pss scan` process >= "
            f"{GOAL_PROCESS_VS_EXACT:.0f}x faster than exact: {ratio:.1f}x"
            + (
                ""
                if startup is None
                else f" (the goal allows {exact_s / GOAL_PROCESS_VS_EXACT:.2f} s in all; "
                f"starting Python and importing torch and pss alone: {startup:.2f} s)"
            )
            + ("" if native else " (a native-bf16 goal; reported only)")
        )
    if ww_s is not None:
        goals.append(
            f"{verdict(ww_s / pss_s >= GOAL_SPEEDUP_VS_WW)} pss >= {GOAL_SPEEDUP_VS_WW:.0f}x "
            f"faster than WeightWatcher: {ww_s / pss_s:.1f}x"
        )
    else:
        goals.append("n/a  pss vs WeightWatcher: not measured")
    if svds_s is not None:
        goals.append(
            f"{verdict(svds_s / pss_s >= GOAL_SPEEDUP_VS_SVDS)} pss >= "
            f"{GOAL_SPEEDUP_VS_SVDS:.0f}x faster than scipy svds: {svds_s / pss_s:.1f}x"
        )
    floor_s = max(x for x in (read_s, floors.get(chosen)) if x is not None)
    ratio = pss_s / floor_s
    goals.append(
        f"{verdict(ratio <= GOAL_FLOOR_RATIO)} pss within {GOAL_FLOOR_RATIO}x of max(read floor, "
        f"{chosen} product floor): {ratio:.2f}x ({fmt_seconds(pss_s)} s vs "
        f"{fmt_seconds(floor_s)} s)"
    )
    for precision, run in pss_runs.items():
        _, _, _, each = errors(run["results"], reference, names)
        worst_sigma = max(p[0] for p in each.values())
        worst_top = max(p[1] for p in each.values())
        goals.append(
            f"{verdict(worst_sigma <= GOAL_SIGMA_MAX_ERR and worst_top <= GOAL_TOP_K_ERR)} "
            f"{precision} products: sigma_max rel err <= {GOAL_SIGMA_MAX_ERR:g} and each top-16 "
            f"<= {GOAL_TOP_K_ERR:g} on every matrix: worst {worst_sigma:.1e} / {worst_top:.1e}"
        )
    say("\nGoals:\n")
    say("\n".join(f"- {g}" for g in goals))
    return "\n".join(out)


def machine_info() -> str:
    cpu, present = cpu_name(), cpu_flags()
    config = torch.__config__.show()
    blas = "MKL" if "BLAS_INFO=mkl" in config else "other (see torch.__config__.show())"
    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    gemm = gemm_times()
    return (
        f"- Date: {dt.datetime.now().astimezone().isoformat(timespec='seconds')}\n"
        f"- CPU: {cpu} ({_cpu_count()} logical CPUs visible); flags {present}; "
        f"instruction-set caps: {isa_caps()}\n"
        f"- torch {torch.__version__}, BLAS {blas} (fp32 GEMM), oneDNN for bf16 GEMM on CPU; "
        f"torch.get_num_threads() = {torch.get_num_threads()}; MKL_CBWR "
        f"{os.environ.get('MKL_CBWR') or 'unset'} in-process (the `pss scan` process sets "
        "AUTO,STRICT unless set: on MKL's AVX2 kernels it slowed pss's fp32 products)\n"
        f"- (4096x4096)@(4096x32), best of 7: fp32 {gemm[0] * 1e3:.2f} ms, bf16 "
        f"{gemm[1] * 1e3:.2f} ms (bf16/fp32 time ratio {gemm[1] / gemm[0]:.3f})\n"
        f"- CUDA device: {cuda}\n"
        f"- Python {platform.python_version()}"
    )


def gemm_times() -> tuple[float, float]:
    generator = torch.Generator().manual_seed(SEED)
    a = torch.randn(1, 4096, 4096, generator=generator)
    v = torch.randn(1, 4096, 32, generator=generator)
    best = []
    for x, y in ((a, v), (a.bfloat16(), v.bfloat16())):
        x @ y
        times = []
        for _ in range(7):
            t0 = time.perf_counter()
            x @ y
            times.append(time.perf_counter() - t0)
        best.append(min(times))
    return best[0], best[1]


def choose_auto(options: argparse.Namespace) -> tuple[str, float]:
    """What `--precision auto` picks here (pss's own calibration) and the ratio it measured."""
    from pss_cli.config import BF16_MIN_SPEEDUP
    from pss_cli.core.precision import choose_precision

    choice = choose_precision(
        "auto", torch.device(options.compute_device), torch.float32, BF16_MIN_SPEEDUP
    )
    return choice.products, float(choice.bf16_time_ratio or math.nan)


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0))


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=[*WORKLOADS, "all"], default="all")
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed runs per method (median reported); default 3 for fast methods "
        "(pss, floor, svd_lowrank) and 1 for exact svdvals and WeightWatcher",
    )
    parser.add_argument("--out", type=Path, help="also write the tables as Markdown to this file")
    parser.add_argument(
        "--exact-device", default="cpu", help="device of the exact baseline (default cpu)"
    )
    parser.add_argument(
        "--pss-device", default="auto", help="pss ScanConfig.device (default auto: cuda if any)"
    )
    parser.add_argument(
        "--bf16",
        choices=("auto", "always"),
        default="auto",
        help="pss with bf16 products and their floor: only where --precision auto picks bf16 "
        "(default), or always (minutes where bf16 GEMMs are emulated)",
    )
    parser.add_argument(
        "--ww-site",
        default=None,
        help="extra folder appended to sys.path to import weightwatcher from (e.g. one made "
        "with `pip install --target DIR weightwatcher==0.7.7`)",
    )
    # Hidden: the subprocess side of one method.
    for flag in (
        "--method",
        "--checkpoint",
        "--manifest",
        "--result",
        "--iterations",
        "--lowrank",
        "--compute-device",
        "--precision",
    ):
        parser.add_argument(flag, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats is not None and args.repeats < 1 and args.method is None:
        parser.error("--repeats must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    options = parse_args(argv)
    if options.method:
        run_method(options)
        return
    # svd_lowrank and the floor run where pss computes, so that they are compared like for like.
    if options.pss_device == "auto":
        options.compute_device = "cuda" if torch.cuda.is_available() else "cpu"
    else:
        options.compute_device = options.pss_device
    started = time.perf_counter()
    header = "## pss scan benchmark\n\n" + machine_info()
    print(header, flush=True)
    sections = [header]
    names = list(WORKLOADS) if options.workload == "all" else [options.workload]
    for name in names:
        sections.append(bench_workload(WORKLOADS[name](), options))
    footer = f"\nTotal benchmark wall time: {time.perf_counter() - started:.0f} s"
    print(footer)
    sections.append(footer)
    if options.out:
        options.out.write_text("\n".join(sections) + "\n")
        print(f"Markdown written to {options.out}")


if __name__ == "__main__":
    main()
