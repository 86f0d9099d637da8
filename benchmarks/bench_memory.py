"""Peak memory and wall time of `pss scan` on a multi-GB BF16 checkpoint, against its floors.

    python benchmarks/bench_memory.py [--dir DIR] [--keep] [--blocks N] [--device cpu|cuda:N]
                                      [--cache warm|cold] [--out FILE.md]

Writes (once: a folder that already holds the same checkpoint is reused) a synthetic sharded BF16
checkpoint shaped like Llama-7B: `--blocks` decoder blocks (q/k/v/o 4096x4096, gate/up 11008x4096,
down 4096x11008, two RMSNorm weights), the 32000x4096 embedding and lm_head; 10 blocks are 4.6 GB.
Each matrix is a Marchenko-Pastur bulk plus 0-3 rank-1 spikes (the generator of bench_scan.py),
so the solver does the work it does on early-training weights. Then, each in a fresh subprocess:

- read floor: every byte of every shard read with large `readinto` calls into one reused buffer
  (what any scanner must at least do);
- compute floor: pss's solver (`top_singular_values`, same seeds and settings) on every matrix,
  with the matrix already in memory in the dtype the scan's loader gives the solver (bf16 for
  BF16 matrices with bf16 products, else float32): reading and converting untimed; per shard
  the faster of one matrix at a time on all threads and two at once on half of them each (the
  scan's own schedule on a CPU);
- `pss scan DIR --format json -o FILE` through the CLI's own entry point in a fresh process,
  wall time from spawn to exit (interpreter start and imports included), peak RSS = the
  process's VmHWM (ru_maxrss would include the parent's size before exec on Linux).

Each row also gives the process's CPU seconds (user + sys; the compute floor's are the solver's
only), which a shared machine's load distorts less than wall time. It prints a table with the
ratio of the scan's wall time to max(read floor, compute floor), the figure the issue asks to keep
close to 1, and the goals (peak RSS < 1.5 GB; the ratio is reported).
`--cache cold` drops the page cache before each measured run (needs root; refused otherwise);
`warm` (default) reads the files once first, so every run reads from the page cache.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from cpu_info import cpu_flags, cpu_name, isa_caps

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scan import MatrixSpec, build_matrix  # a sibling script, not a package

SEED = 20261124
GOAL_PEAK_RSS_BYTES = 1.5e9
READ_BUFFER_BYTES = 64 * 2**20
SHARD_TARGET_BYTES = 2**30  # ~1 GiB shards, as HF writes them (several files to open and close)
MARKER = "bench_memory.json"
BLOCK_SHAPES = (
    ("self_attn.q_proj", (4096, 4096)),
    ("self_attn.k_proj", (4096, 4096)),
    ("self_attn.v_proj", (4096, 4096)),
    ("self_attn.o_proj", (4096, 4096)),
    ("mlp.gate_proj", (11008, 4096)),
    ("mlp.up_proj", (11008, 4096)),
    ("mlp.down_proj", (4096, 11008)),
)
VOCAB = 32000
HIDDEN = 4096


# --------------------------------------------------------------------------------------------
# The checkpoint
# --------------------------------------------------------------------------------------------


def tensor_specs(blocks: int) -> list[tuple[str, tuple[int, ...], int]]:
    """(name, shape, spikes) in file order; spikes cycle 0-3 so every shape gets hard cases."""
    specs: list[tuple[str, tuple[int, ...], int]] = [
        ("model.embed_tokens.weight", (VOCAB, HIDDEN), 1)
    ]
    for block in range(blocks):
        prefix = f"model.layers.{block}."
        for i, (name, shape) in enumerate(BLOCK_SHAPES):
            specs.append((f"{prefix}{name}.weight", shape, (block + i) % 4))
        specs.append((f"{prefix}input_layernorm.weight", (HIDDEN,), 0))
        specs.append((f"{prefix}post_attention_layernorm.weight", (HIDDEN,), 0))
    specs.append(("model.norm.weight", (HIDDEN,), 0))
    specs.append(("lm_head.weight", (VOCAB, HIDDEN), 2))
    return specs


def _nbytes(shape: tuple[int, ...]) -> int:
    count = 2  # BF16
    for dim in shape:
        count *= dim
    return count


def write_checkpoint(folder: Path, blocks: int) -> int:
    """Stream the shards to disk one tensor at a time; return the total tensor bytes."""
    folder.mkdir(parents=True, exist_ok=True)
    specs = tensor_specs(blocks)
    shards: list[list[tuple[str, tuple[int, ...], int]]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + _nbytes(spec[1]) > SHARD_TARGET_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += _nbytes(spec[1])
    generator = torch.Generator().manual_seed(SEED)
    weight_map: dict[str, str] = {}
    total = 0
    for number, shard in enumerate(shards, start=1):
        file_name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
        cursor = 0
        for name, shape, _ in shard:
            header[name] = {
                "dtype": "BF16",
                "shape": list(shape),
                "data_offsets": [cursor, cursor + _nbytes(shape)],
            }
            cursor += _nbytes(shape)
            weight_map[name] = file_name
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with open(folder / file_name, "wb") as out:
            out.write(len(raw).to_bytes(8, "little") + raw)
            for name, shape, spikes in shard:
                if len(shape) == 2:
                    matrix = build_matrix(
                        MatrixSpec(name, (shape[0], shape[1]), spikes), torch.bfloat16, generator
                    )
                else:
                    matrix = (1.0 + 0.02 * torch.randn(shape, generator=generator)).bfloat16()
                out.write(matrix.view(torch.uint8).numpy().tobytes())
                del matrix
        total += cursor
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    return total


def ensure_checkpoint(folder: Path, blocks: int) -> int:
    marker = folder / MARKER
    wanted = {"seed": SEED, "blocks": blocks, "version": 1}
    if marker.exists() and json.loads(marker.read_text()).get("spec") == wanted:
        return int(json.loads(marker.read_text())["bytes"])
    print(f"writing the synthetic checkpoint to {folder} ...", file=sys.stderr, flush=True)
    started = time.perf_counter()
    total = write_checkpoint(folder, blocks)
    marker.write_text(json.dumps({"spec": wanted, "bytes": total}))
    print(f"  {total / 1e9:.2f} GB in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return total


# --------------------------------------------------------------------------------------------
# Measured runs (each in its own subprocess)
# --------------------------------------------------------------------------------------------


def shard_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def method_read(folder: Path) -> dict[str, Any]:
    buffer = bytearray(READ_BUFFER_BYTES)
    view = memoryview(buffer)
    total = 0
    started = time.perf_counter()
    for path in shard_files(folder):
        with open(path, "rb", buffering=0) as handle:
            while True:
                got = handle.readinto(view)
                if not got:
                    break
                total += got
    return {"seconds": time.perf_counter() - started, "bytes": total}


def method_compute(folder: Path, device_spec: str, products: str) -> dict[str, Any]:
    """pss's own solver on each matrix, from memory; reading and the copy are untimed.
    ``products`` (fp32 | bf16): the Krylov products' dtype, the one the scan uses.

    Per shard, the faster of two schedules: one matrix after another on all of torch's
    threads, or two at once on half of them each (largest first, to the less loaded thread),
    as the scan solves its batches on a CPU (pss_cli/pipeline/solve.py). The floor is the best
    either way, never the slower."""
    from safetensors import safe_open

    from pss_cli.config import DEFAULT_TOP_K
    from pss_cli.core.norms import buffer_norm, scale_to_unit
    from pss_cli.core.spectra import KrylovSettings, gaussian_start, top_singular_values
    from pss_cli.pipeline import matrix_seed, resolve_device

    device = resolve_device(device_spec)
    settings = KrylovSettings(bf16_products=products == "bf16")
    threads = torch.get_num_threads()
    solve = 0.0
    solve_cpu = 0.0
    matrices = 0
    schedules: list[str] = []

    def solve_all(work: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        for matrix, start in work:
            top_singular_values(matrix.unsqueeze(0), DEFAULT_TOP_K, start, settings)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def solve_half(work: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        torch.set_num_threads(max(1, threads // 2))
        solve_all(work)

    for path in shard_files(folder):
        work: list[tuple[torch.Tensor, torch.Tensor]] = []
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            for name in handle.keys():  # noqa: SIM118 (safe_open is not a Mapping)
                stored = handle.get_tensor(name)
                if stored.dim() != 2:
                    continue
                tall = stored if stored.shape[0] >= stored.shape[1] else stored.mT
                # The dtype the scan's loader gives the solver (pipeline/loader.py): a BF16
                # matrix stays bf16 when the products are bf16, else float32.
                keep_bf16 = products == "bf16" and stored.dtype == torch.bfloat16
                dtype = torch.bfloat16 if keep_bf16 else torch.float32
                matrix = torch.empty(tall.shape, dtype=dtype, device=device)
                matrix.copy_(tall)
                del stored, tall
                # Scaled by a power of two where the scan's loader scales (core.norms.
                # scale_to_unit): the values stay exact, so bf16 products see the checkpoint's
                # own bf16 values. Dividing by the norm itself rounded them, and the bf16 solver
                # then fell back to fp32 products on most matrices (the floor came out slower
                # than the scan).
                norm = buffer_norm(matrix)  # the loader's own norm (pipeline/loader.py)
                scale_to_unit(matrix, norm)
                start = gaussian_start(
                    [matrix_seed(0, name, None)], matrix.shape[1], settings.block_size
                )
                work.append((matrix, start))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0, c0 = time.perf_counter(), time.process_time()
        solve_all(work)
        in_turn, in_turn_cpu = time.perf_counter() - t0, time.process_time() - c0
        at_once, at_once_cpu = math.inf, math.inf
        if device.type == "cpu" and threads >= 2 and len(work) >= 2:
            shares: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[], []]
            loads = [0, 0]
            for item in sorted(work, key=lambda x: -x[0].numel()):
                lighter = loads.index(min(loads))
                shares[lighter].append(item)
                loads[lighter] += item[0].numel()
            t0, c0 = time.perf_counter(), time.process_time()
            with ThreadPoolExecutor(2) as pool:
                list(pool.map(solve_half, shares))
            at_once, at_once_cpu = time.perf_counter() - t0, time.process_time() - c0
            torch.set_num_threads(threads)
        if at_once < in_turn:
            solve, solve_cpu = solve + at_once, solve_cpu + at_once_cpu
            schedules.append("two at once")
        else:
            solve, solve_cpu = solve + in_turn, solve_cpu + in_turn_cpu
            schedules.append("in turn")
        matrices += len(work)
        del work
    return {
        "seconds": solve,
        "solve_cpu_seconds": solve_cpu,
        "matrices": matrices,
        "schedules": schedules,
    }


def peak_rss_bytes() -> int:
    """This process's peak RSS since its exec: VmHWM. Not ru_maxrss, which Linux carries over
    from the pre-exec image (the parent's size at fork), so small children look as big as us."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def method_scan(folder: Path, device: str, report: Path, products: str) -> dict[str, Any]:
    """The CLI in this process, exactly as `pss scan` runs it (typer app, rendering, -o FILE)."""
    from pss_cli.app import main as pss_main

    sys.argv = ["pss", "scan", str(folder), "--format", "json", "-o", str(report)]
    sys.argv += ["--device", device, "--precision", products, "-q"]
    stdout = sys.stdout
    code = 0
    try:
        with open(os.devnull, "w") as sink:
            sys.stdout = sink
            pss_main()
    except SystemExit as exc:
        code = int(exc.code or 0)
    finally:
        sys.stdout = stdout
    return {"exit": code}


def run_method(method: str, folder: Path, device: str, products: str) -> dict[str, Any]:
    command = [sys.executable, __file__, "--method", method, "--dir", str(folder)]
    command += ["--device", device, "--precision", products]
    done = subprocess.run(command, check=True, capture_output=True, text=True)
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def run_scan(folder: Path, device: str, report: Path, products: str) -> dict[str, Any]:
    """`pss scan` in a fresh process; wall time from spawn to exit (imports included)."""
    command = [sys.executable, __file__, "--method", "scan", "--dir", str(folder)]
    command += ["--device", device, "--report", str(report), "--precision", products]
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0 or not report.exists():
        raise SystemExit(f"pss scan failed ({done.returncode}):\n{done.stderr}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    data = json.loads(report.read_text())
    return {
        "seconds": wall,
        "cpu_seconds": result["cpu_seconds"],
        "peak_rss": result["peak_rss"],
        "timings": data["timings"],
        "matrices": data["summary"]["matrices"],
    }


def baseline_rss() -> int:
    """Peak RSS of a process that only imports torch and pss's scan modules (to subtract)."""
    code = (
        "import sys, torch, pss_cli.pipeline; sys.path.insert(0, sys.argv[1]); "
        "import bench_memory; print(bench_memory.peak_rss_bytes())"
    )
    here = str(Path(__file__).resolve().parent)
    done = subprocess.run([sys.executable, "-c", code, here], check=True, capture_output=True)
    return int(done.stdout)


def drop_page_cache() -> None:
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as handle:
            handle.write("3\n")
    except OSError as exc:
        raise SystemExit(f"--cache cold needs root and a writable drop_caches: {exc}") from None


# --------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", type=Path, help="checkpoint folder (default: a temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the generated checkpoint")
    parser.add_argument("--blocks", type=int, default=10, help="decoder blocks (10: 4.6 GB)")
    parser.add_argument("--device", default="cpu", help="pss --device for scan and floor")
    parser.add_argument("--cache", choices=("warm", "cold"), default="warm")
    parser.add_argument("--out", type=Path, help="also write the table as Markdown")
    parser.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16"),
        default="auto",
        help="Krylov products of both the scan and the compute floor (auto: measured once here, "
        "as pss scan --precision auto does, then pinned for both)",
    )
    parser.add_argument("--method", choices=("read", "compute", "scan"), help=argparse.SUPPRESS)
    parser.add_argument("--report", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.method is not None:
        if args.method == "read":
            result = method_read(args.dir)
        elif args.method == "compute":
            result = method_compute(args.dir, args.device, args.precision)
        else:
            result = method_scan(args.dir, args.device, args.report, args.precision)
        result["peak_rss"] = peak_rss_bytes()
        usage = resource.getrusage(resource.RUSAGE_SELF)
        # The compute floor counts the solver's CPU time only (its reads are not part of it).
        result["cpu_seconds"] = result.pop("solve_cpu_seconds", usage.ru_utime + usage.ru_stime)
        print(json.dumps(result))
        return

    scratch = None
    if args.dir is None:
        scratch = tempfile.TemporaryDirectory(prefix="pss-bench-memory-")
        args.dir = Path(scratch.name)
    try:
        total = ensure_checkpoint(args.dir, args.blocks)
        measure(args, total)
    finally:
        if scratch is not None:
            if args.keep:
                print(f"kept the checkpoint in {args.dir}", file=sys.stderr)
                scratch._finalizer.detach()  # type: ignore[attr-defined]
            else:
                scratch.cleanup()


def measure(args: argparse.Namespace, total: int) -> None:
    def prepare() -> None:
        if args.cache == "cold":
            drop_page_cache()
        else:
            method_read(args.dir)  # warm the page cache

    load_before = os.getloadavg()[0]
    from pss_cli.config import BF16_MIN_SPEEDUP
    from pss_cli.core.precision import choose_precision
    from pss_cli.pipeline import resolve_device

    # One choice for both the scan and the compute floor: two processes calibrating apart
    # could pick different products on a loaded machine, and the ratio would compare unlike.
    choice = choose_precision(
        args.precision, resolve_device(args.device), torch.float32, BF16_MIN_SPEEDUP
    )
    products = choice.products
    prepare()
    read = run_method("read", args.dir, args.device, products)
    prepare()
    with tempfile.TemporaryDirectory() as tmp:
        scan = run_scan(args.dir, args.device, Path(tmp) / "report.json", products)
    prepare()
    compute = run_method("compute", args.dir, args.device, products)
    base = baseline_rss()
    floor = max(read["seconds"], compute["seconds"])
    gib = 2**30
    rows = [
        ("read floor (readinto, 64 MiB buffer)", read),
        ("compute floor (solver only, from memory)", compute),
        ("pss scan (CLI, process start to exit)", scan),
    ]
    lines = [
        f"- Date: {dt.datetime.now(dt.UTC).isoformat(timespec='seconds')}",
        f"- CPU: {cpu_name()}, flags {cpu_flags()}; instruction-set caps: {isa_caps()}; "
        f"{os.cpu_count()} logical CPUs, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), Python "
        f"{platform.python_version()}",
        f"- Checkpoint: {args.blocks} Llama-7B-shaped blocks + embedding + lm_head, BF16, "
        f"{len(shard_files(args.dir))} shards, {total / 1e9:.2f} GB ({total / gib:.2f} GiB), "
        f"{scan['matrices']} matrices",
        f"- Krylov products: {products} (--precision {args.precision}, basis {choice.basis}; "
        f"measured bf16/fp32 time ratio {choice.bf16_time_ratio})",
        f"- Device: {args.device}; page cache: {args.cache}; 1-minute load average "
        f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after (the machine is shared: "
        "figures under load are slower and the ratio noisier)",
        "",
        "| run | wall s | GB/s | CPU s of the process | peak RSS MiB |",
        "|---|---|---|---|---|",
    ]
    for label, run in rows:
        rate = total / 1e9 / run["seconds"]
        lines.append(
            f"| {label} | {run['seconds']:.1f} | {rate:.2f} | {run['cpu_seconds']:.0f} | "
            f"{run['peak_rss'] / 2**20:.0f} |"
        )
    timings = ", ".join(f"{k} {v:.1f}" for k, v in scan["timings"].items())
    ratio = scan["seconds"] / floor
    rss_ok = scan["peak_rss"] < GOAL_PEAK_RSS_BYTES
    lines += [
        "",
        f"- scan's own timings (s): {timings}",
        f"- peak RSS of a process that only imports torch and pss: {base / 2**20:.0f} MiB",
        f"- compute floor's schedule per shard: {', '.join(compute.get('schedules', []))}",
        f"- wall / max(read floor, compute floor) = {scan['seconds']:.1f} / {floor:.1f} = "
        f"{ratio:.2f}",
        f"- goal peak RSS < 1.5 GB: {'PASS' if rss_ok else 'FAIL'} "
        f"({scan['peak_rss'] / 1e9:.2f} GB)",
    ]
    text = "\n".join(lines)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
