"""Loading: file bytes -> staging buffer -> compute buffer (on the compute device), with the
norm and non-finite count of each matrix taken on the way."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch

from pss_cli.checkpoint.model import TensorEntry
from pss_cli.checkpoint.reader import TensorReader
from pss_cli.checkpoint.selection import MatrixTarget
from pss_cli.checkpoint.torch_dtypes import torch_dtype_or_none
from pss_cli.config import STAGING_BUFFER_BYTES
from pss_cli.core.norms import (
    buffer_norm,
    count_nonfinite,
    frobenius_norm,
    scale_to_unit,
)
from pss_cli.pipeline.memory import Batch
from pss_cli.pipeline.plan import MatrixItem, ScanPlan, krylov_path

# Stored dtypes streamed straight into the compute buffer (a copy_ converts them exactly).
_STREAMED_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}


@dataclass
class _Loaded:
    batch: Batch
    # (B, m, n) tall, on the device, each matrix divided by 2**exponents[i] (to unit norm, or
    # by 1: core/norms.py, scale_to_unit); compute dtype, or bf16 (`_Loader.buffer_dtype`)
    buffer: torch.Tensor
    frobenius: list[float]
    nonfinite: list[int]
    exponents: list[int]


class _Loader:
    """Fills a batch's compute buffer. Runs in the loader thread; `seconds` is its busy time.

    On CUDA, host bytes land in two pinned staging buffers used in turn, are copied to the device
    on a side stream (asynchronously, so the next file read overlaps the transfer) and converted
    to the compute dtype there: bf16/fp16 cross the bus at their stored size.
    """

    def __init__(self, reader: TensorReader, plan: ScanPlan) -> None:
        self.reader = reader
        self.plan = plan
        self.seconds = 0.0
        self._cuda = plan.device.type == "cuda"
        self._host: list[torch.Tensor] = []
        self._ready: list[Any] = []  # CUDA events: staging buffer i may be overwritten
        self._turn = 0
        self._stream: Any = None

    def load(self, batch: Batch) -> _Loaded:
        t0 = time.perf_counter()
        try:
            if not self._cuda:
                return self._load(batch)
            # Everything the loader does on the device (allocation, transfers, upcasts, norms)
            # runs on its own stream, so it overlaps the solver's kernels on the default stream.
            stream = self._copy_stream()
            with torch.cuda.device(self.plan.device), torch.cuda.stream(stream):
                loaded = self._load(batch)
                stream.synchronize()  # every write into the buffer has landed
            # The buffer is freed by the solver's thread after default-stream work: the caching
            # allocator must not hand it to the loader's stream before that work is done.
            loaded.buffer.record_stream(torch.cuda.default_stream(self.plan.device))
            return loaded
        finally:
            self.seconds += time.perf_counter() - t0

    def _load(self, batch: Batch) -> _Loaded:
        try:
            return self._fill(batch)
        finally:
            # Pages touched through a memory map (formats without positional reads) count in
            # RSS while mapped: unmap after every batch, so they leave with it.
            self.reader.release_mappings()

    def _fill(self, batch: Batch) -> _Loaded:
        tall_m, tall_n = batch.items[0].tall_shape
        dtype = self.buffer_dtype(batch)
        buffer = torch.empty(len(batch.items), tall_m, tall_n, dtype=dtype, device=self.plan.device)
        frobenius: list[float] = []
        nonfinite: list[int] = []
        exponents: list[int] = []
        for slot, item in enumerate(batch.items):
            target = buffer[slot]
            if self._streamable(item):
                self._stream_into(item, target)
                norm, bad, exponent = _finish_target(target)
            else:
                norm, bad, exponent = _copy_source(_source_matrix(self.reader, item), target)
            frobenius.append(norm)
            nonfinite.append(bad)
            exponents.append(exponent)
        return _Loaded(batch, buffer, frobenius, nonfinite, exponents)

    def buffer_dtype(self, batch: Batch) -> torch.dtype:
        """The buffer's dtype: bfloat16 for a batch of BF16 matrices whose Krylov products are
        bf16 anyway, else the compute dtype.

        Why: the values are exact in bf16 (scaled by a power of two), so the solver multiplies
        the stored matrix itself. The float32 buffer it replaces cost a conversion pass here, a
        bf16 copy in the solver (fp32 -> bf16, 43 ms per 11008 x 4096 matrix on an AMD EPYC
        Zen 4, 2 threads) and twice the memory; the one float32 product per matrix that vouches
        for the values converts the matrix a slab at a time (core/mixed_precision.py).
        """
        plan = self.plan
        if not plan.settings.bf16_products or plan.dtype != torch.float32:
            return plan.dtype
        if not krylov_path(batch.items[0].tall_shape, plan.config, plan.settings):
            return plan.dtype
        stored_bf16 = all(
            item.target.entry.dtype == "BF16" and self._streamable(item) for item in batch.items
        )
        return torch.bfloat16 if stored_bf16 else plan.dtype

    def _streamable(self, item: MatrixItem) -> bool:
        entry = item.target.entry
        target = item.target
        if target.scale is not None or target.norm_magnitude is not None:
            return False  # the analysed matrix is computed from two tensors (_source_matrix)
        if not self.reader.can_read_into(entry):
            return False
        if entry.dtype in _STREAMED_DTYPES:
            return True
        # float64 into float64 is exact; into float32 it needs the source's own norm first.
        return entry.dtype == "F64" and self.plan.dtype == torch.float64

    def _stream_into(self, item: MatrixItem, target: torch.Tensor) -> None:
        """Copy the stored (m, n) matrix into `target` ((m, n), or (n, m) for a wide one),
        a few MiB of rows at a time, converting to the compute dtype on the way."""
        entry = item.target.entry
        stored = _STREAMED_DTYPES.get(entry.dtype, torch.float64)
        m, n = item.target.matrix_shape
        row_bytes = n * stored.itemsize
        first = (item.index or 0) * m * row_bytes  # a stacked tensor's matrices lie back to back
        wide = m < n
        if not self._cuda and not wide and stored == target.dtype:
            # Stored as computed: read straight into the buffer, no staging copy at all.
            self.reader.read_into(entry, target, first)
            return
        rows_per_chunk = max(1, STAGING_BUFFER_BYTES // row_bytes)
        for r0 in range(0, m, rows_per_chunk):
            rows = min(rows_per_chunk, m - r0)
            dest = target[:, r0 : r0 + rows] if wide else target[r0 : r0 + rows]
            host = self._staging(rows * row_bytes, stored, (rows, n))
            self.reader.read_into(entry, host, first + r0 * row_bytes)
            if self._cuda:
                self._to_device(host, dest, wide)
            else:
                dest.copy_(host.mT if wide else host)

    def _staging(self, nbytes: int, dtype: torch.dtype, shape: tuple[int, int]) -> torch.Tensor:
        """A (rows, n) view of the next staging buffer, once its previous transfer is done."""
        size = max(nbytes, STAGING_BUFFER_BYTES)
        if not self._host:
            count = 2 if self._cuda else 1
            self._host = [
                torch.empty(size, dtype=torch.uint8, pin_memory=self._cuda) for _ in range(count)
            ]
            self._ready = [None] * count
        turn = self._turn
        if self._ready[turn] is not None:
            self._ready[turn].synchronize()
        if self._host[turn].numel() < nbytes:  # a single row wider than the staging buffer
            self._host[turn] = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self._cuda)
        return self._host[turn][:nbytes].view(dtype).view(shape)

    def _to_device(self, host: torch.Tensor, dest: torch.Tensor, wide: bool) -> None:
        """Runs on the loader's stream (see `load`): the transfer is asynchronous from pinned
        memory, and the event tells `_staging` when this host buffer may be refilled."""
        staged = host.to(self.plan.device, non_blocking=True)  # stored dtype on the bus
        event = torch.cuda.Event()  # type: ignore[no-untyped-call]
        event.record()
        dest.copy_(staged.mT if wide else staged)  # any bf16/fp16 -> fp32 upcast, on device
        self._ready[self._turn] = event
        self._turn = (self._turn + 1) % len(self._host)

    def _copy_stream(self) -> Any:
        if self._stream is None:
            self._stream = torch.cuda.Stream(self.plan.device)  # type: ignore[no-untyped-call]
        return self._stream


def _finish_target(target: torch.Tensor) -> tuple[float, int, int]:
    """Norm, non-finite count and unit-norm scaling (its exponent) of a matrix copied exactly
    into `target`.

    bf16/fp16/fp32 values (and float64 into float64) are exact in the buffer, so the norm and
    the NaN/Inf count can be taken from it.
    """
    norm = buffer_norm(target)
    bad = 0 if math.isfinite(norm) else count_nonfinite(target)
    if not math.isfinite(norm) or norm == 0.0:
        # float64 weights near 1e200 overflow the sum of squares, near 1e-200 underflow it.
        norm = 0.0 if bad else frobenius_norm(target)
    # Scale to unit Frobenius norm: tiny fp16 or huge weights stay well inside float32's range
    # through the Krylov products; singular values are rescaled afterwards.
    return norm, bad, scale_to_unit(target, norm)


def _copy_source(source: torch.Tensor, target: torch.Tensor) -> tuple[float, int, int]:
    """The fallback path: a whole (m, n) source matrix (memory-mapped or dequantized)."""
    oriented = source if source.shape[0] >= source.shape[1] else source.mT
    if source.dtype == torch.float64 and target.dtype == torch.float32:
        # float64 weights may not fit float32: measure on the source, scale, then copy.
        bad = count_nonfinite(source)
        norm = 0.0 if bad else frobenius_norm(source)
        scaled = oriented.clone()  # float64: the power-of-two division is exact there
        exponent = scale_to_unit(scaled, norm)
        target.copy_(scaled)
        return norm, bad, exponent
    # copy_ into a reused buffer, not .float(): 10-15x faster on CPU (docs/DESIGN.md).
    target.copy_(oriented)
    norm = buffer_norm(target)
    bad = 0 if math.isfinite(norm) else count_nonfinite(source)
    if not math.isfinite(norm) or norm == 0.0:
        norm = 0.0 if bad else frobenius_norm(source)
    return norm, bad, scale_to_unit(target, norm)


def _source_matrix(reader: TensorReader, item: MatrixItem) -> torch.Tensor:
    """One whole (m, n) matrix in its stored dtype (dequantized when it has a scale): for
    quantized tensors, float64 sources of a float32 scan, and formats without positional reads.
    Only this matrix's bytes are read, not its whole stack."""
    target = item.target
    slot = item.index if item.index is not None else 0
    if target.norm_magnitude is not None:
        weight: torch.Tensor = target.as_matrices(_weight_norm(reader, target))[slot]
        return weight
    matrix = _read_matrix(reader, target.entry, target.matrix_shape, slot)
    if matrix is None:
        matrix = target.as_matrices(reader.read(target.entry))[slot]
    if target.scale is not None:
        # Dequantize in float32 (float64 for float64 scales): (q - zero_point) * scale, the
        # scale broadcast per tensor or per channel, or tiled per block, as stored. The spectrum
        # of q alone means nothing.
        scale = _whole(reader, target.scale)
        dtype = torch.float64 if scale.dtype == torch.float64 else torch.float32
        values = matrix.to(dtype)
        if target.zero_point is not None:
            zero = _per_entry(target, _whole(reader, target.zero_point), slot)
            values = values - zero.to(dtype)
        matrix = values * _per_entry(target, scale, slot).to(dtype)
    return matrix


def _weight_norm(reader: TensorReader, target: MatrixTarget) -> torch.Tensor:
    """The weight a weight-normalised layer uses, g * v / ||v||, the norm taken over every
    dimension where g has size 1 (torch's weight_norm), in float32 (float64 if either is)."""
    assert target.norm_magnitude is not None
    v = _whole(reader, target.entry)
    g = _whole(reader, target.norm_magnitude)
    dtype = torch.float64 if torch.float64 in (v.dtype, g.dtype) else torch.float32
    v, g = v.to(dtype), g.to(dtype)
    dims = [i for i, size in enumerate(g.shape) if size == 1]
    norms: torch.Tensor = torch.linalg.vector_norm(v, dim=dims, keepdim=True)
    return v * (g / norms)


def _per_entry(target: MatrixTarget, part: torch.Tensor, slot: int) -> torch.Tensor:
    """A scale or zero point as one value per entry of matrix `slot`: broadcast per tensor or
    channel, or tiled over (bm, bn) blocks (of the one matrix, or of matrix `slot` of a stack)."""
    if target.scale_block is None:
        tiled: torch.Tensor = target.as_matrices(torch.broadcast_to(part, target.entry.shape))
        return tiled[slot]
    m, n = target.matrix_shape
    rows, cols = target.scale_block
    if part.dim() == 3:  # one (s0, s1) block grid per matrix of a stack
        part = part[slot]
    return part.repeat_interleave(rows, 0).repeat_interleave(cols, 1)[:m, :n]


def _whole(reader: TensorReader, entry: TensorEntry) -> torch.Tensor:
    tensor = _read_matrix(reader, entry, None, 0)
    return tensor if tensor is not None else reader.read(entry)


def _read_matrix(
    reader: TensorReader, entry: TensorEntry, shape: tuple[int, int] | None, slot: int
) -> torch.Tensor | None:
    """Matrix `slot` of `entry` viewed as (-1, *shape) (the whole tensor when shape is None),
    read into a fresh tensor with positional reads; None where the reader cannot (then the
    caller maps the file)."""
    dtype = torch_dtype_or_none(entry.dtype)
    if dtype is None or not reader.can_read_into(entry):
        return None
    out = torch.empty(shape if shape is not None else entry.shape, dtype=dtype)
    reader.read_into(entry, out, slot * out.numel() * out.element_size())
    return out


# --------------------------------------------------------------------------------------------
# Solving
# --------------------------------------------------------------------------------------------
