"""Per-checkpoint scan results cached on disk, keyed so that a changed file is never served.

The key holds the pss version, every scan setting that changes a number, and for each file of the
checkpoint its resolved path, size, mtime_ns, ctime_ns and inode, plus a SHA-256 of its whole
safetensors header (every tensor's name, dtype, shape and offsets) and of its first and last
64 KiB. `touch -d` can restore an mtime but not a ctime, and any rewrite changes the ctime: a
same-size rewrite is caught without reading the whole checkpoint. Entries are written
atomically; an unreadable or mismatched entry is a miss.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, BinaryIO

from pss_cli import __version__
from pss_cli.config import ScanConfig

CACHE_FORMAT = 2
DEFAULT_CACHE_DIR_NAME = ".pss-cache"
_EDGE_BYTES = 64 * 1024
_MAX_HEADER_BYTES = 100_000_000  # the safetensors format's own limit


def cache_key(checkpoint: Path, config: ScanConfig) -> dict[str, Any]:
    return {
        "cache_format": CACHE_FORMAT,
        "pss_version": __version__,
        "scan": {
            "include": list(config.include),
            "exclude": list(config.exclude),
            "top_k": config.top_k,
            "min_stable_rank": config.min_stable_rank,
            "exact": config.exact,
            "device": config.device,
            "seed": config.seed,
            "compute_dtype": str(config.compute_dtype),
            "exact_max_dim": config.exact_max_dim,
            # bf16 and fp32 products agree only within the stated tolerance: a scan made with
            # other products is another scan.
            "precision": str(config.precision),
        },
        "checkpoint": str(checkpoint.resolve()),
        "files": [_fingerprint(path) for path in _checkpoint_files(checkpoint)],
    }


def load(cache_dir: Path, key: dict[str, Any]) -> dict[str, Any] | None:
    """The cached scan JSON for `key`, or None (absent, unreadable, or written for another key)."""
    path = cache_dir / _entry_name(key)
    try:
        entry = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    if not isinstance(entry, dict) or entry.get("key") != key:
        return None
    report = entry.get("report")
    return report if isinstance(report, dict) else None


def store(cache_dir: Path, key: dict[str, Any], report: dict[str, Any]) -> None:
    """Write one entry atomically (temp file + rename); raises OSError when it cannot."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"key": key, "report": report}, allow_nan=False)
    fd, temp = tempfile.mkstemp(prefix=".entry.", suffix=".tmp", dir=cache_dir)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(temp, cache_dir / _entry_name(key))
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def _entry_name(key: dict[str, Any]) -> str:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return f"scan-{digest[:32]}.json"


def _checkpoint_files(checkpoint: Path) -> list[Path]:
    """Every regular file that can hold part of the checkpoint: the file itself, its folder's
    files when it is an index (the shards live beside it), or a folder's files, recursively."""
    if checkpoint.is_file():
        if checkpoint.name.endswith(".index.json"):
            return sorted(p for p in checkpoint.parent.iterdir() if p.is_file())
        return [checkpoint]
    files: list[Path] = []
    for folder, dirs, names in os.walk(checkpoint):
        dirs[:] = sorted(d for d in dirs if d != DEFAULT_CACHE_DIR_NAME)
        files.extend(Path(folder) / name for name in sorted(names))
    return [f for f in files if f.is_file()]


def _fingerprint(path: Path) -> dict[str, Any]:
    stat = path.stat()
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        digest.update(_header_bytes(handle, path, stat.st_size))
        handle.seek(0)
        digest.update(handle.read(_EDGE_BYTES))
        if stat.st_size > 2 * _EDGE_BYTES:
            handle.seek(stat.st_size - _EDGE_BYTES)
            digest.update(handle.read(_EDGE_BYTES))
    return {
        "path": str(path.resolve()),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "ctime_ns": stat.st_ctime_ns,
        "inode": stat.st_ino,
        "header_edges_sha256": digest.hexdigest(),
    }


def _header_bytes(handle: BinaryIO, path: Path, size: int) -> bytes:
    """A safetensors file's whole header (names, dtypes, shapes, offsets), however long: large
    models' headers outgrow the first 64 KiB. Bounded by the format's 100 MB header limit and by
    the file, so a hostile length field costs nothing."""
    if not path.name.endswith(".safetensors") or size < 8:
        return b""
    length = int.from_bytes(handle.read(8), "little")
    if length > min(size - 8, _MAX_HEADER_BYTES):
        return b""  # not a valid header: the scan will say so; the edges still key the file
    return handle.read(length)
