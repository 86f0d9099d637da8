"""Which tensors are analysed as matrices, with their role and block index (torch-free).

Roles come from tensor names through one ordered regex table (first match wins), covering the
HF names of GPT-2, BERT, Llama/Mistral/Qwen2, Phi, Falcon/Bloom, GPT-NeoX, GPT-J, OPT, T5,
Mixtral and stacked-expert MoE, and Meta's original Llama names. Unknown names get ``other``:
a wrong role is worse than none, because thresholds depend on the role (docs/DESIGN.md: embeddings
have tiny stable ranks by nature).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from fnmatch import fnmatchcase
from math import prod
from typing import TYPE_CHECKING

from pss_cli.checkpoint.model import TensorEntry

if TYPE_CHECKING:
    import torch


class Role(StrEnum):
    EMBEDDING = "embedding"
    ATTN_Q = "attn_q"
    ATTN_K = "attn_k"
    ATTN_V = "attn_v"
    ATTN_O = "attn_o"
    ATTN_QKV = "attn_qkv"  # fused Q, K, V (GPT-2 c_attn, Falcon/NeoX query_key_value, Phi-3)
    MLP_UP = "mlp_up"
    MLP_GATE = "mlp_gate"
    MLP_GATE_UP = "mlp_gate_up"  # fused gate and up projections
    MLP_DOWN = "mlp_down"
    LM_HEAD = "lm_head"
    OTHER = "other"


class MatrixView(StrEnum):
    MATRIX = "matrix"  # 2-D (m, n)
    CONV = "conv"  # (out, in, *kernel) seen as (out, in * prod(kernel))
    STACKED = "stacked"  # (E, m, n): E matrices analysed one by one (e.g. MoE experts)


ANALYSED_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})


def _seg(names: str) -> str:
    """Regex for one dotted name segment among ``names`` (an alternation)."""
    return rf"(?:^|\.)(?:{names})(?:\.|$)"


# Ordered: context-specific patterns (BERT attention.output.dense, GPT-2 attn.c_proj vs
# mlp.c_proj, T5 DenseReluDense.wo vs Llama attention.wo) come before the generic ones.
_ROLE_TABLE: tuple[tuple[re.Pattern[str], Role], ...] = tuple(
    (re.compile(pattern), role)
    for pattern, role in (
        # Output heads. GPT-NeoX's embed_out is its LM head; Meta's Llama names it output.weight.
        (_seg("lm_head|embed_out"), Role.LM_HEAD),
        (r"^output\.weight$", Role.LM_HEAD),
        (r"(?:^|\.)cls\.predictions\.decoder\.", Role.LM_HEAD),
        # MoE routers are (E, d) scoring matrices, not projections.
        (_seg(r"router|gate|shared_expert_gate"), Role.OTHER),
        # Embedding tables.
        (
            _seg(
                r"wte|wpe|shared|embed_tokens|embed_positions|tok_embeddings|embed_in|emb"
                r"|relative_attention_bias|\w*_embeddings?|embeddings?"
            ),
            Role.EMBEDDING,
        ),
        # Fused attention input projections.
        (_seg(r"c_attn|query_key_value|qkv_proj|Wqkv|qkv|in_proj_weight"), Role.ATTN_QKV),
        # DeepSeek-V2/V3 multi-head latent attention: the low-rank query pair makes queries, the
        # KV pair makes keys and values together (kv_a also the shared RoPE key).
        (_seg(r"q_a_proj|q_b_proj"), Role.ATTN_Q),
        (_seg(r"kv_a_proj_with_mqa|kv_b_proj"), Role.ATTN_QKV),
        # Attention outputs (before the generic MLP "dense"/"c_proj"/"wo" patterns).
        (r"(?:^|\.)attention\.output\.dense\.", Role.ATTN_O),
        (
            r"(?:^|\.)(?:attn|self_attn|self_attention|attention)\.(?:c_proj|dense|wo)(?:\.|$)",
            Role.ATTN_O,
        ),
        (_seg(r"o_proj|out_proj|out_lin|to_out|o"), Role.ATTN_O),
        # Separate Q, K, V.
        (_seg(r"q_proj|query|wq|q_lin|to_q|q|q_attn"), Role.ATTN_Q),
        (_seg(r"k_proj|key|wk|k_lin|to_k|k"), Role.ATTN_K),
        (_seg(r"v_proj|value|wv|v_lin|to_v|v"), Role.ATTN_V),
        # Fused MLP input.
        (_seg(r"gate_up_proj|w13|gate_up"), Role.MLP_GATE_UP),
        # Mixtral experts and Meta's feed_forward: w1 = gate, w3 = up, w2 = down.
        (r"(?:experts\.\d+|feed_forward)\.w1(?:\.|$)", Role.MLP_GATE),
        (r"(?:experts\.\d+|feed_forward)\.w3(?:\.|$)", Role.MLP_UP),
        (r"(?:experts\.\d+|feed_forward)\.w2(?:\.|$)", Role.MLP_DOWN),
        # T5: DenseReluDense.wi (or gated wi_0 = gate, wi_1 = up) and wo.
        (r"(?:^|\.)DenseReluDense\.wi_0(?:\.|$)", Role.MLP_GATE),
        (r"(?:^|\.)DenseReluDense\.wi(?:_1)?(?:\.|$)", Role.MLP_UP),
        (r"(?:^|\.)DenseReluDense\.wo(?:\.|$)", Role.MLP_DOWN),
        # MLP projections; BERT's "intermediate.dense" and "output.dense" after attention ones.
        (_seg(r"gate_proj"), Role.MLP_GATE),
        (r"(?:^|\.)intermediate\.dense\.", Role.MLP_UP),
        # ConvNeXt's pointwise convolutions pwconv1/2 are its MLP; Wav2Vec2's feed_forward has
        # intermediate_dense and output_dense.
        (
            _seg(r"up_proj|c_fc|fc1|fc_in|dense_h_to_4h|lin1|pwconv1|intermediate_dense"),
            Role.MLP_UP,
        ),
        (r"(?:^|\.)(?:mlp|ffn)\.c_proj\.", Role.MLP_DOWN),
        (r"(?:^|\.)output\.dense\.", Role.MLP_DOWN),
        (_seg(r"down_proj|fc2|fc_out|dense_4h_to_h|lin2|pwconv2"), Role.MLP_DOWN),
        (r"(?:^|\.)feed_forward\.output_dense(?:\.|$)", Role.MLP_DOWN),
        (r"(?:^|\.)(?:mlp|ffn|feed_forward)\.(?:up|w_in)(?:\.|$)", Role.MLP_UP),
        (r"(?:^|\.)(?:mlp|ffn|feed_forward)\.(?:down|w_out)(?:\.|$)", Role.MLP_DOWN),
    )
)

# The first "<container>.<int>" in the name is the transformer block; later integers are
# sub-layers (T5 block.N.layer.M) or experts (experts.N).
_BLOCK_INDEX = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block|encoder_layers)\.(\d+)(?:\.|$)")


def classify(name: str) -> tuple[Role, int | None]:
    """Role of tensor ``name`` and its block index (None when the name has none)."""
    block_match = _BLOCK_INDEX.search(name)
    block = int(block_match.group(1)) if block_match else None
    for pattern, role in _ROLE_TABLE:
        if pattern.search(name):
            return role, block
    return Role.OTHER, block


@dataclass(frozen=True)
class MatrixTarget:
    """A tensor analysed as ``batch`` matrices of shape ``matrix_shape``."""

    entry: TensorEntry
    role: Role
    block: int | None
    batch: int
    matrix_shape: tuple[int, int]  # (m, n) of each matrix
    view: MatrixView
    # For an integer/8-bit-float tensor stored with a float scale (per tensor, per channel, or
    # per (bm, bn) block as DeepSeek-V3-style FP8 stores `weight_scale_inv`): the scale, and
    # the zero point of asymmetric quantization where one is stored, so that the dequantized
    # matrix (q - zero_point) * scale is analysed.
    scale: TensorEntry | None = None
    zero_point: TensorEntry | None = None
    scale_block: tuple[int, int] | None = None  # (bm, bn) of a block-wise scale
    # For a weight-normalised tensor stored as direction v and magnitude g (torch's weight_norm:
    # `X.weight_v` + `X.weight_g`, or parametrize's `...original1` + `...original0`): g, so that
    # the weight the model uses, g * v / ||v||, is analysed, not the direction alone.
    norm_magnitude: TensorEntry | None = None

    def as_matrices(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` (``entry.shape``) as (batch, m, n); a view whenever ``t`` is contiguous.

        Transposed storage (HF Conv1D keeps (in, out)) is not undone: singular values of W and
        W^T are equal, so spectra do not care.
        """
        if tuple(t.shape) != self.entry.shape:
            raise ValueError(f"tensor shape {tuple(t.shape)} != header shape {self.entry.shape}")
        return t.reshape(self.batch, *self.matrix_shape)


@dataclass(frozen=True)
class SkippedTarget:
    entry: TensorEntry
    reason: str  # human readable, e.g. "1-D tensor (bias or norm scale)"


def glob_literal(name: str) -> str:
    """A glob that matches exactly `name`, even when it holds [ ] * ? (tensor names can)."""
    return "".join(f"[{c}]" if c in "[]*?" else c for c in name)


def select(
    entries: Iterable[TensorEntry],
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
) -> tuple[list[MatrixTarget], list[SkippedTarget]]:
    """Split ``entries`` into analysed matrices and skipped tensors (with reasons).

    ``include``/``exclude`` are fnmatch globs on the full name (case-sensitive); an empty
    ``include`` means every tensor. Exclusion wins over inclusion.
    """
    entries = list(entries)
    parts_or_reasons = _quantization_parts(entries)
    quantized = {n: q for n, q in parts_or_reasons.items() if isinstance(q, _Quantization)}
    refused = {n: q for n, q in parts_or_reasons.items() if isinstance(q, str)}
    used_by = {
        part.name: name
        for name, q in quantized.items()
        for part in (q.scale, q.zero_point)
        if part is not None
    }
    # Metadata names are judged only in a checkpoint that holds quantized tensors: a float
    # model's own 2-D weight named `...scale` is a weight.
    quantized_checkpoint = any(
        e.dtype in QUANTIZED_DTYPES or e.dtype == "I32" for e in entries if len(e.shape) >= 2
    )
    magnitudes = weight_norm_pairs(entries)
    magnitude_of = {g.name: v for v, g in magnitudes.items()}
    targets: list[MatrixTarget] = []
    skipped: list[SkippedTarget] = []
    for entry in entries:
        if entry.name in magnitude_of:
            skipped.append(
                SkippedTarget(
                    entry,
                    f"weight-norm magnitude g of '{magnitude_of[entry.name]}' (analysed with it "
                    "as the weight g * v / ||v||)",
                )
            )
            continue
        if entry.name in used_by:
            owner = used_by[entry.name]
            kind = "zero point" if quantized[owner].zero_point is entry else "scale"
            skipped.append(SkippedTarget(entry, f"{kind} of quantized '{owner}' (used with it)"))
            continue
        parts = quantized.get(entry.name)
        reason = (
            _filter_reason(entry.name, include, exclude)
            or _adapter_reason(entry.name)
            or _shape_reason(entry)
            or refused.get(entry.name)
            or (_metadata_reason(entry) if quantized_checkpoint else None)
            or (None if parts is not None else _shape_dtype_reason(entry))
        )
        if reason is not None:
            skipped.append(SkippedTarget(entry, reason))
            continue
        view, batch, matrix_shape = _view_of(entry)
        if min(matrix_shape) == 1:
            # Stable rank of a rank-1 matrix is exactly 1: reporting it would be a false alarm.
            skipped.append(SkippedTarget(entry, "a dimension of 1 (stable rank is always 1)"))
            continue
        role, block = classify(_base_name(entry.name))
        targets.append(
            MatrixTarget(
                entry,
                role,
                block,
                batch,
                matrix_shape,
                view,
                parts.scale if parts is not None else None,
                parts.zero_point if parts is not None else None,
                parts.block if parts is not None else None,
                magnitudes.get(entry.name),
            )
        )
    return targets, skipped


# torch.nn.utils.weight_norm's and torch.nn.utils.parametrizations.weight_norm's names.
_WEIGHT_NORM_PAIRS = (("weight_v", "weight_g"), ("weight.original1", "weight.original0"))


def weight_norm_pairs(entries: Iterable[TensorEntry]) -> dict[str, TensorEntry]:
    """Direction tensor name -> its magnitude g, for weight-normalised tensors whose g
    broadcasts against v with one dimension kept (g has v's rank, and size 1 but in one dim).

    Analysing v alone reported the direction's spectrum: on a Wav2Vec2 positional conv, stable
    rank 30.6 and sigma_max 0.83 where the weight the model builds had 7.76 and 42.1.
    """
    by_name = {entry.name: entry for entry in entries}
    pairs: dict[str, TensorEntry] = {}
    for name, v in by_name.items():
        for direction, magnitude in _WEIGHT_NORM_PAIRS:
            if not name.endswith(direction):
                continue
            g = by_name.get(name[: -len(direction)] + magnitude)
            if g is not None and is_weight_norm_magnitude(g.shape, v.shape):
                pairs[name] = g
    return pairs


def names_weight_norm_magnitude(name: str) -> bool:
    """Whether a report's `scale_tensor` is a weight-norm magnitude g (not a quantization
    scale)."""
    return any(name.endswith(magnitude) for _, magnitude in _WEIGHT_NORM_PAIRS)


def is_weight_norm_magnitude(g: tuple[int, ...], v: tuple[int, ...]) -> bool:
    kept = [i for i, size in enumerate(g) if size != 1]
    return len(g) == len(v) and len(kept) <= 1 and all(g[i] == v[i] for i in kept)


QUANTIZED_DTYPES = frozenset({"I8", "U8", "F8_E4M3", "F8_E5M2", "F8_E4M3FNUZ", "F8_E5M2FNUZ"})
_QWEIGHT_SUFFIX = ".qweight"


def _base_name(name: str) -> str:
    """`x.weight.qweight` -> `x.weight`, so that a quantized weight gets its layer's role."""
    return name[: -len(_QWEIGHT_SUFFIX)] if name.endswith(_QWEIGHT_SUFFIX) else name


def _scale_candidates(name: str) -> list[str]:
    """Where common formats keep a quantized tensor's scale: fracast-style `W.qweight` +
    `W.scale`, HF FP8 / compressed-tensors `W` + `W_scale` (e.g. `weight_scale`), `W.scale`,
    and DeepSeek-V3 / Qwen3 FP8's block-wise `W_scale_inv` (multiplied, despite its name)."""
    base = _base_name(name)
    return [
        base + ".scale",
        name + ".scale",
        name + "_scale",
        base + "_scale",
        name + "_scale_inv",
        base + "_scale_inv",
    ]


def _zero_point_candidates(name: str) -> list[str]:
    """compressed-tensors' asymmetric `W_zero_point`, and `W.zero_point`."""
    base = _base_name(name)
    return [name + "_zero_point", base + "_zero_point", name + ".zero_point", base + ".zero_point"]


def _broadcasts(scale: tuple[int, ...], shape: tuple[int, ...]) -> bool:
    if len(scale) == 0 or all(d == 1 for d in scale):
        return True  # one scale for the whole tensor
    if len(scale) != len(shape):
        return False
    return all(s in (1, d) for s, d in zip(scale, shape, strict=True))


# The block of block-wise FP8 scales (DeepSeek-V3, Qwen3 FP8: `weight_block_size` [128, 128]).
_STANDARD_BLOCK = 128


def _block_of(scale: tuple[int, ...], shape: tuple[int, ...]) -> tuple[int, int] | None:
    """(bm, bn) when a 2-D scale holds one value per (bm, bn) block of a 2-D tensor, or a
    (E, s0, s1) scale one per block of each matrix of an (E, m, n) stack (transformers 5 keeps
    DeepSeek-V3's FP8 experts stacked as `experts.gate_up_proj` + `experts.gate_up_proj_scale_inv`).

    With partial edge blocks the shapes alone are ambiguous (300 rows in 3 blocks: any block
    of 100 to 149 rows), so the standard 128 x 128 block is taken when it fits, else blocks
    that divide the tensor exactly; otherwise no block (the tensor is then skipped, never
    dequantized with a guessed block).
    """
    if len(scale) == len(shape) == 3 and scale[0] == shape[0]:
        scale, shape = scale[1:], shape[1:]  # per matrix of the stack
    if len(scale) != 2 or len(shape) != 2 or 0 in scale:
        return None
    if all(-(-d // _STANDARD_BLOCK) == s for d, s in zip(shape, scale, strict=True)):
        return (_STANDARD_BLOCK, _STANDARD_BLOCK)
    if all(d % s == 0 for d, s in zip(shape, scale, strict=True)):
        block = (shape[0] // scale[0], shape[1] // scale[1])
        return None if block == (1, 1) else block
    return None


@dataclass(frozen=True)
class _Quantization:
    scale: TensorEntry
    zero_point: TensorEntry | None
    block: tuple[int, int] | None


def _quantization_parts(entries: list[TensorEntry]) -> dict[str, _Quantization | str]:
    """Quantized tensor name -> its float scale (and zero point), where a scale that broadcasts
    or tiles it exists; or -> the reason it cannot be dequantized.

    Only then is an integer / 8-bit-float tensor meaningful as a matrix: its spectrum is that of
    (q - zero_point) * scale (per-channel scales change it), never that of the raw integers. A
    zero point broadcasts like a per-channel scale, or has the shape of a block-wise (per-group)
    scale and tiles with it; one that fits neither makes the tensor skipped: ignoring it analysed
    a uint8 matrix offset by ~128 x scale in every entry (a rank-1 spike: stable rank 1.15
    instead of 20).
    """
    by_name = {entry.name: entry for entry in entries}
    found: dict[str, _Quantization | str] = {}
    for entry in entries:
        if entry.dtype not in QUANTIZED_DTYPES or len(entry.shape) < 2:
            continue
        for candidate in _scale_candidates(entry.name):
            scale = by_name.get(candidate)
            if scale is None or scale.dtype not in ANALYSED_DTYPES:
                continue
            broadcasts = _broadcasts(scale.shape, entry.shape)
            block = None if broadcasts else _block_of(scale.shape, entry.shape)
            if block is None and not broadcasts:
                # Its scale is there, in a layout pss cannot tile: said so (it read as "without
                # a scale tensor found"); another candidate may still fit.
                found.setdefault(
                    entry.name,
                    f"{entry.dtype} weight whose scale '{scale.name}' {list(scale.shape)} "
                    f"neither broadcasts nor tiles {list(entry.shape)} in blocks: not dequantized, "
                    "not analysed",
                )
                continue
            zero_name = next((z for z in _zero_point_candidates(entry.name) if z in by_name), None)
            zero_point = by_name[zero_name] if zero_name is not None else None
            if zero_point is not None and not (
                _broadcasts(zero_point.shape, entry.shape)
                if block is None
                else zero_point.shape == scale.shape
            ):
                found[entry.name] = (
                    f"zero point '{zero_point.name}' {list(zero_point.shape)} does not fit its "
                    f"scale '{scale.name}' {list(scale.shape)}: not dequantized"
                )
                break
            found[entry.name] = _Quantization(scale, zero_point, block)
            break
    return found


# What a skip reason says when a weight matrix could not be read (quantized without a usable
# scale, packed): `pss check` names such tensors rather than pass the model in silence.
_UNANALYSED_MARKERS = ("without a scale tensor found", "not analysed", "not dequantized")


def is_unanalysed_weight(shape: Sequence[int], reason: str) -> bool:
    """A skipped 2-D (or larger) tensor that is a weight pss could not analyse (not metadata,
    not a filter's choice, not an adapter factor)."""
    if len(shape) < 2 or min(shape) < 2 or "LoRA" in reason:
        return False  # a (1, N) buffer of ids is no weight matrix
    if any(wide in reason for wide in ("I64", "I16", "U16", "U32", "BOOL", "bool")):
        return False  # position ids, attention masks: not a quantized weight
    return any(marker in reason for marker in _UNANALYSED_MARKERS)


# The last name segments of quantization metadata, never weight matrices: GPTQ/AWQ (`scales`,
# `qzeros`, `g_idx` beside an int32-packed `qweight`), bitsandbytes (`absmax`, `quant_map`,
# `SCB`), compressed-tensors / FP8 (`weight_scale`, `input_scale`, `*_zero_point`), KV-cache
# scales. A 2-D float16 GPTQ `scales` (groups x out) was analysed as an MLP matrix, flagged, and
# rewritten by `pss smooth`.
_METADATA_SEGMENTS = frozenset(
    {
        "scales",
        "scale",
        "qzeros",
        "zeros",
        "g_idx",
        "absmax",
        "nested_absmax",
        "quant_map",
        "nested_quant_map",
        "SCB",
        "weight_format",
    }
)
_METADATA_SUFFIXES = ("_scale", "_scale_inv", "_zero_point")


def _metadata_reason(entry: TensorEntry) -> str | None:
    last = entry.name.rsplit(".", 1)[-1]
    if (
        last in _METADATA_SEGMENTS
        or last.endswith(_METADATA_SUFFIXES)
        or ".quant_state." in entry.name
    ):
        return f"quantization metadata ('{last}'), not a weight matrix"
    if last == "qweight" and entry.dtype == "I32":
        return "packed quantized weights (GPTQ/AWQ int32): not unpacked, not analysed"
    return None


# PEFT's LoRA factors (`...q_proj.lora_A.weight`, `lora_embedding_B`): the layer's update is
# B @ A, low-rank by design. Judged alone, a trained A failed the stable-rank floor and smooth
# rewrote A without B, changing the update arbitrarily.
_LORA_SEGMENTS = frozenset({"lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"})


def _adapter_reason(name: str) -> str | None:
    if _LORA_SEGMENTS.isdisjoint(name.split(".")):
        return None
    return (
        "a LoRA adapter factor (low-rank by design): not analysed; scan the merged model "
        "(peft's merge_and_unload) to see the weights the adapter changes"
    )


def _filter_reason(name: str, include: Sequence[str], exclude: Sequence[str]) -> str | None:
    for pattern in exclude:
        if fnmatchcase(name, pattern):
            return f"excluded by --exclude '{pattern}'"
    if include and not any(fnmatchcase(name, pattern) for pattern in include):
        return "not matched by --include"
    return None


def _shape_reason(entry: TensorEntry) -> str | None:
    ndim = len(entry.shape)
    if ndim == 0:
        return "scalar"
    if ndim == 1:
        return "1-D tensor (bias or norm scale)"
    if 0 in entry.shape:
        return "empty tensor (a zero-sized dimension)"
    return None


def _shape_dtype_reason(entry: TensorEntry) -> str | None:
    dtype = entry.dtype
    shape_reason = _shape_reason(entry)
    if shape_reason is not None:
        return shape_reason
    if dtype in ANALYSED_DTYPES:
        return None
    if dtype == "BOOL":
        return "BOOL dtype"
    if dtype[0] in "IU":
        return f"integer dtype {dtype} (index data, or quantized without a scale tensor found)"
    if dtype.startswith("F8"):
        return f"{dtype} (8-bit float without a scale tensor found)"
    if dtype.startswith(("F4", "F6")):
        return f"{dtype} ({dtype[1]}-bit float without a scale)"
    return f"unsupported dtype {dtype}"


def _view_of(entry: TensorEntry) -> tuple[MatrixView, int, tuple[int, int]]:
    shape, lowered = entry.shape, entry.name.lower()
    if len(shape) == 2:
        return MatrixView.MATRIX, 1, (shape[0], shape[1])
    # 3-D is ambiguous: a conv1d kernel (out, in, k) has a small k, stacked experts (E, m, n)
    # do not; the name settles it when it can.
    is_conv_3d = "conv" in lowered or (shape[-1] <= 7 and "expert" not in lowered)
    if len(shape) == 3 and not is_conv_3d:
        return MatrixView.STACKED, shape[0], (shape[1], shape[2])
    return MatrixView.CONV, 1, (shape[0], prod(shape[1:]))
