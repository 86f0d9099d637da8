"""torch dtype <-> safetensors dtype string, the one dtype vocabulary of TensorEntry."""

from __future__ import annotations

import torch

# Optional dtypes (newer torch releases only) are added when this torch has them.
_TORCH_TO_CODE: dict[torch.dtype, str] = {
    torch.bool: "BOOL",
    torch.uint8: "U8",
    torch.int8: "I8",
    torch.int16: "I16",
    torch.int32: "I32",
    torch.int64: "I64",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float32: "F32",
    torch.float64: "F64",
    torch.complex64: "C64",
}
for _attr, _code in (
    ("uint16", "U16"),
    ("uint32", "U32"),
    ("uint64", "U64"),
    ("float8_e4m3fn", "F8_E4M3"),
    ("float8_e5m2", "F8_E5M2"),
    ("float8_e4m3fnuz", "F8_E4M3FNUZ"),
    ("float8_e5m2fnuz", "F8_E5M2FNUZ"),
    ("float8_e8m0fnu", "F8_E8M0"),
):
    if isinstance(getattr(torch, _attr, None), torch.dtype):
        _TORCH_TO_CODE[getattr(torch, _attr)] = _code
_CODE_TO_TORCH = {code: dtype for dtype, code in _TORCH_TO_CODE.items()}


def safetensors_dtype(dtype: torch.dtype) -> str | None:
    """ "F32", "BF16", ... for a torch dtype; None for one safetensors has no name for."""
    return _TORCH_TO_CODE.get(dtype)


def torch_dtype_of(code: str) -> torch.dtype:
    return _CODE_TO_TORCH[code]


def torch_dtype_or_none(code: str) -> torch.dtype | None:
    """The torch dtype of a safetensors dtype string; None when this torch has none for it."""
    return _CODE_TO_TORCH.get(code)
