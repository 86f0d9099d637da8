"""Fuzzing: hypothesis mutates small valid safetensors files and pss must stay well-behaved.

The properties: the library (``open_checkpoint`` + ``scan_checkpoint``) raises nothing but pss's
typed errors (``PssError``); the CLI exits 0 with valid JSON, or 3 (``scan``) / 1 (``check``,
a ``PSS002`` finding) with exactly one ``Error:`` line and one ``Hint:`` line; every example
finishes within a time bound (hypothesis ``deadline`` plus a SIGALRM watchdog against hangs).

Budget: ``PSS_FUZZ_EXAMPLES`` examples per test (default 40, about 290 in all with the byte flips,
about 10 s); e.g. ``PSS_FUZZ_EXAMPLES=5000 python -m pytest -q tests/test_fuzz.py`` for a long run.
"""

from __future__ import annotations

import copy
import json
import math
import os
import signal
import struct
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from pss_cli.app import app
from pss_cli.checkpoint.discover import open_checkpoint
from pss_cli.config import ScanConfig
from pss_cli.errors import PssError
from pss_cli.pipeline import scan_checkpoint
from tests.safetensors_factory import ITEM_BYTES, encode_header, layout_header

EXAMPLES = int(os.environ.get("PSS_FUZZ_EXAMPLES", "40"))
# Per example: the deadline catches slow paths (hypothesis re-runs a slow example to confirm it
# before failing); the watchdog turns a hang, which no deadline can interrupt, into a failure.
# Typical examples take 1-100 ms (library) and 40-1000 ms (CLI); the margin is for shared CI
# machines, where one CLI example once took 7 s under a load of 9 on 2 cores.
DEADLINE = timedelta(seconds=20)
WATCHDOG_S = 60
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=DEADLINE,
    derandomize=EXAMPLES <= 100,  # CI-sized runs are reproducible; long runs explore
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
)
CONFIG = ScanConfig(top_k=4, device="cpu")

# Seeds: small valid files covering the shapes the scan treats differently (2-D, 1-D, 3-D stacks
# and conv kernels, quantized + scale, skipped dtypes, a 0-sized dimension, no tensors at all).
SEEDS: list[list[tuple[str, str, tuple[int, ...]]]] = [
    [("a.weight", "F32", (6, 5)), ("a.bias", "F16", (6,))],
    [("h.0.w", "BF16", (4, 8)), ("h.1.w", "F64", (3, 3)), ("ids", "I64", (2, 2))],
    [("experts.w", "F32", (3, 4, 5)), ("conv.weight", "F16", (4, 2, 3, 3))],
    [("q.weight", "I8", (8, 4)), ("q.weight_scale", "F32", (8, 1)), ("m", "BOOL", (2, 2))],
    [("f8.weight", "F8_E4M3", (4, 4)), ("e", "F32", (0, 3)), ("row", "F32", (1, 7))],
    [],
]
DTYPES = [*ITEM_BYTES, "F8_E8M0", "F4", "F6_E2M3", "C64", "f32", "", "F128", "FP8"]


def _seed_bytes(index: int, metadata: dict[str, str] | None = None) -> tuple[dict[str, Any], bytes]:
    header, data_len = layout_header(SEEDS[index], metadata)
    # Values spread across the float range (including NaN/Inf bit patterns in every dtype).
    data = bytes((i * 37 + 11) % 256 for i in range(data_len))
    return header, data


def _file_bytes(header: dict[str, Any], data: bytes) -> bytes:
    raw = encode_header(header)
    return struct.pack("<Q", len(raw)) + raw + data


@contextmanager
def _watchdog() -> Iterator[None]:
    def alarm(_signum: int, _frame: object) -> None:
        raise TimeoutError(f"example did not finish within {WATCHDOG_S} s (a hang)")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(WATCHDOG_S)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _library_accepts_or_refuses(blob: bytes, record: bool = True) -> None:
    """Only PssError may escape; a file that opens must scan to a finite-safe report.
    ``record``: count the outcome in hypothesis' statistics (only inside a @given test)."""
    note = event if record else (lambda _text: None)
    with tempfile.TemporaryDirectory() as tmp, _watchdog():
        path = Path(tmp) / "model.safetensors"
        path.write_bytes(blob)
        try:
            layout = open_checkpoint(path)
        except PssError as exc:
            _one_line_error(exc)
            note("refused by the header checks")
            return
        try:
            report = scan_checkpoint(path, CONFIG)
        except PssError as exc:
            _one_line_error(exc)
            note("refused while scanning")
            return
        note("opened and scanned")
        # every tensor is accounted for: analysed, or skipped with a reason
        accounted = {x.name for x in report.layers} | {s.name for s in report.skipped}
        assert {e.name for e in layout.entries} == accounted
        assert all(s.reason for s in report.skipped)
        for layer in report.layers:
            for value in (layer.sigma_max, layer.stable_rank, layer.frobenius_norm):
                assert value is None or math.isfinite(value)  # NaN/Inf become null
        assert path.read_bytes() == blob  # never written to


def _one_line_error(exc: PssError) -> None:
    assert exc.message and exc.message.isprintable(), exc.message
    assert exc.hint is None or exc.hint.isprintable()


# ---------------------------------------------------------------------------------------------
# Mutation strategies: each draws a seed file and damages it in one way.

seed_index = st.integers(0, len(SEEDS) - 1)


@st.composite
def length_prefix(draw: st.DrawFn) -> bytes:
    header, data = _seed_bytes(draw(seed_index))
    blob = _file_bytes(header, data)
    true_len = struct.unpack("<Q", blob[:8])[0]
    new_len = draw(
        st.one_of(
            st.integers(0, 2**64 - 1),
            st.integers(max(0, true_len - 16), true_len + 16),
            st.sampled_from([0, 1, 2, 7, 8, 99_999_999, 100_000_000, 100_000_001, 2**63]),
        )
    )
    return struct.pack("<Q", new_len) + blob[8:]


@st.composite
def header_bytes(draw: st.DrawFn) -> bytes:
    """Overwrite, insert or delete a few bytes inside the header JSON."""
    header, data = _seed_bytes(draw(seed_index))
    blob = bytearray(_file_bytes(header, data))
    header_end = 8 + struct.unpack("<Q", blob[:8])[0]
    for _ in range(draw(st.integers(1, 4))):
        where = draw(st.integers(8, max(8, header_end - 1)))
        byte = draw(
            st.one_of(
                st.binary(min_size=1, max_size=3),
                st.sampled_from(
                    [
                        b'"',
                        b"{",
                        b"}",
                        b"[",
                        b"]",
                        b",",
                        b":",
                        b"-",
                        b"0",
                        b"9" * 30,
                        b"\\",
                        b"\xff",
                        b"\\ud800",
                        b"\n",
                        b"1e999",
                        b"null",
                        b"true",
                    ]
                ),
            )
        )
        action = draw(st.sampled_from(["overwrite", "insert", "delete"]))
        if action == "overwrite":
            blob[where : where + len(byte)] = byte
        elif action == "insert":
            blob[where:where] = byte
        else:
            del blob[where : where + len(byte)]
    if draw(st.booleans()):  # keep the length prefix consistent with the edited header
        new_len = header_end - 8 + (len(blob) - len(_file_bytes(header, data)))
        blob[:8] = struct.pack("<Q", max(0, new_len))
    return bytes(blob)


json_value = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=6),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner, max_size=3)
    ),
    max_leaves=8,
)


@st.composite
def json_fields(draw: st.DrawFn) -> bytes:
    """Rewrite dtype, shape, data_offsets or the metadata with plausible or absurd values."""
    index = draw(st.integers(0, len(SEEDS) - 2))  # a seed with tensors
    header, data = _seed_bytes(index, draw(st.none() | st.just({"format": "pt"})))
    names = [n for n in header if n != "__metadata__"]
    pristine = copy.deepcopy(header)  # earlier edits may have removed what later ones start from
    for _ in range(draw(st.integers(1, 3))):
        name = draw(st.sampled_from(names))
        field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "drop", "replace", "meta"]))
        entry = header[name]
        if not isinstance(entry, dict):
            continue  # replaced by an earlier edit: already as broken as it gets
        if field == "dtype":
            entry["dtype"] = draw(st.sampled_from(DTYPES) | json_value)
        elif field == "shape":
            entry["shape"] = draw(
                st.lists(st.integers(-3, 2**40), max_size=5)
                | st.permutations(pristine[name]["shape"]).map(list)
                | json_value
            )
        elif field == "data_offsets":
            begin, end = pristine[name]["data_offsets"]
            entry["data_offsets"] = draw(
                st.tuples(st.integers(begin - 8, end + 8), st.integers(begin - 8, end + 8)).map(
                    list
                )
                | st.lists(st.integers(-(2**64), 2**64), max_size=3)
                | json_value
            )
        elif field == "drop":
            entry.pop(draw(st.sampled_from(["dtype", "shape", "data_offsets"])), None)
        elif field == "replace":
            header[name] = draw(json_value)
        else:
            header["__metadata__"] = draw(json_value)
    return _file_bytes(header, data)


@st.composite
def truncated_or_extended(draw: st.DrawFn) -> bytes:
    header, data = _seed_bytes(draw(seed_index))
    blob = _file_bytes(header, data)
    if draw(st.booleans()):
        return blob[: draw(st.integers(0, len(blob)))]
    return blob + draw(st.binary(min_size=1, max_size=64))


@st.composite
def valid_but_odd(draw: st.DrawFn) -> bytes:
    """Well-formed files with random names, dtypes, shapes (zeros, ones, long thin, stacks) and
    random data bytes (NaN, Inf, subnormals in every float format): the scan path itself."""
    names = draw(st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=5, unique=True))
    dims = st.sampled_from([0, 1, 2, 3, 7, 8, 33]) | st.integers(1, 600)
    specs = []
    for name in names:
        shape = draw(st.lists(dims, max_size=4))
        while math.prod(shape) > 40_000:  # keep each example fast
            shape = shape[1:]
        specs.append((name, draw(st.sampled_from(list(ITEM_BYTES))), tuple(shape)))
    header, data_len = layout_header(specs, draw(st.none() | st.just({"format": "pt"})))
    data = draw(st.binary(min_size=min(data_len, 64), max_size=min(data_len, 64)))
    data = (data * (data_len // max(1, len(data)) + 1))[:data_len] if data else bytes(data_len)
    return _file_bytes(header, data)


any_mutation = st.one_of(
    valid_but_odd(), length_prefix(), header_bytes(), json_fields(), truncated_or_extended()
)


@FUZZ
@given(blob=length_prefix())
def test_fuzz_length_prefix(blob: bytes) -> None:
    _library_accepts_or_refuses(blob)


@FUZZ
@given(blob=header_bytes())
def test_fuzz_header_bytes(blob: bytes) -> None:
    _library_accepts_or_refuses(blob)


@FUZZ
@given(blob=json_fields())
def test_fuzz_json_fields(blob: bytes) -> None:
    _library_accepts_or_refuses(blob)


@FUZZ
@given(blob=truncated_or_extended())
def test_fuzz_truncation_and_junk(blob: bytes) -> None:
    _library_accepts_or_refuses(blob)


def _f64_file(shape: list[int], data: bytes) -> bytes:
    return _file_bytes(
        {"w": {"dtype": "F64", "shape": shape, "data_offsets": [0, len(data)]}}, data
    )


# Found by this fuzzer (kept as regressions): a subnormal Frobenius norm made 1/norm overflow and
# LAPACK received NaN (an internal error); a norm beyond float64's range gave NaN metrics.
SUBNORMAL_NORM = _f64_file([2, 2], bytes(24) + b"\x01" + bytes(7))
NORM_OVERFLOWS = _f64_file([8, 227], (bytes(6) + b"\xb1\x7f" + bytes(56)) * 227)


@FUZZ
@given(blob=valid_but_odd())
@example(blob=SUBNORMAL_NORM)
@example(blob=NORM_OVERFLOWS)
def test_fuzz_valid_files_with_odd_contents(blob: bytes) -> None:
    _library_accepts_or_refuses(blob)


# ---------------------------------------------------------------------------------------------
# The same mutations through the real CLI (fewer: each invocation renders a full report).


def _cli_run(blob: bytes, argv: Callable[[Path], list[str]]) -> tuple[int, str, str]:
    with tempfile.TemporaryDirectory() as tmp, _watchdog():
        path = Path(tmp) / "model.safetensors"
        path.write_bytes(blob)
        result = CliRunner().invoke(app, argv(path))
        assert path.read_bytes() == blob
        return result.exit_code, result.stdout, result.stderr


def _assert_error_lines(stderr: str) -> None:
    lines = stderr.splitlines()
    assert len(lines) == 2, stderr
    assert lines[0].startswith("Error: ") and lines[1].startswith("Hint: "), stderr
    assert "internal error" not in lines[0] and "Traceback" not in stderr
    assert lines[0].isprintable()


@settings(FUZZ, max_examples=max(10, EXAMPLES // 2))
@given(blob=any_mutation)
def test_fuzz_cli_scan_and_check(blob: bytes) -> None:
    code, stdout, stderr = _cli_run(blob, lambda p: ["scan", str(p), "-f", "json", "-q"])
    assert code in (0, 3), (code, stderr)
    if code == 0:
        report = json.loads(stdout)
        assert report["schema_version"] == 1 and "Traceback" not in stderr
    else:
        assert stdout == ""
        _assert_error_lines(stderr)
    code_check, stdout, stderr = _cli_run(blob, lambda p: ["check", str(p), "-q"])
    assert code_check in (0, 1), (code_check, stdout, stderr)
    assert "Traceback" not in stdout + stderr and "internal error" not in stdout + stderr
    if code == 3:
        assert code_check == 1 and "PSS002" in stdout
    assert all(line.isprintable() for line in stdout.splitlines())


@pytest.mark.parametrize("flip", range(64))
def test_every_prefix_byte_flip_is_refused_cleanly(flip: int) -> None:
    """Deterministic companion: flip each of the first 64 bytes in turn (length field and the
    start of the JSON) of a real seed file."""
    header, data = _seed_bytes(0)
    blob = bytearray(_file_bytes(header, data))
    blob[flip] ^= 0xFF
    _library_accepts_or_refuses(bytes(blob), record=False)
