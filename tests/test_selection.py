"""Roles, block indices, matrix views and include/exclude filtering."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pss_cli.checkpoint.model import TensorEntry
from pss_cli.checkpoint.selection import MatrixView, Role, classify, select


def entry(name: str, shape: tuple[int, ...], dtype: str = "F32") -> TensorEntry:
    return TensorEntry(name, Path("m.safetensors"), dtype, shape, (0, 0))


R = Role
CASES: list[tuple[str, Role, int | None]] = [
    # GPT-2 (Conv1D names)
    ("transformer.wte.weight", R.EMBEDDING, None),
    ("transformer.wpe.weight", R.EMBEDDING, None),
    ("transformer.h.3.attn.c_attn.weight", R.ATTN_QKV, 3),
    ("transformer.h.3.attn.c_proj.weight", R.ATTN_O, 3),
    ("transformer.h.3.mlp.c_fc.weight", R.MLP_UP, 3),
    ("transformer.h.3.mlp.c_proj.weight", R.MLP_DOWN, 3),
    ("transformer.h.3.ln_1.weight", R.OTHER, 3),
    ("lm_head.weight", R.LM_HEAD, None),
    # BERT
    ("bert.embeddings.word_embeddings.weight", R.EMBEDDING, None),
    ("embeddings.token_type_embeddings.weight", R.EMBEDDING, None),
    ("encoder.layer.0.attention.self.query.weight", R.ATTN_Q, 0),
    ("encoder.layer.0.attention.self.key.weight", R.ATTN_K, 0),
    ("encoder.layer.0.attention.self.value.weight", R.ATTN_V, 0),
    ("encoder.layer.0.attention.output.dense.weight", R.ATTN_O, 0),
    ("encoder.layer.0.intermediate.dense.weight", R.MLP_UP, 0),
    ("encoder.layer.0.output.dense.weight", R.MLP_DOWN, 0),
    ("pooler.dense.weight", R.OTHER, None),
    ("cls.predictions.decoder.weight", R.LM_HEAD, None),
    # Llama / Mistral / Qwen2 / Phi-3
    ("model.embed_tokens.weight", R.EMBEDDING, None),
    ("model.layers.12.self_attn.q_proj.weight", R.ATTN_Q, 12),
    ("model.layers.12.self_attn.k_proj.weight", R.ATTN_K, 12),
    ("model.layers.12.self_attn.v_proj.weight", R.ATTN_V, 12),
    ("model.layers.12.self_attn.o_proj.weight", R.ATTN_O, 12),
    ("model.layers.12.mlp.gate_proj.weight", R.MLP_GATE, 12),
    ("model.layers.12.mlp.up_proj.weight", R.MLP_UP, 12),
    ("model.layers.12.mlp.down_proj.weight", R.MLP_DOWN, 12),
    ("model.layers.1.self_attn.qkv_proj.weight", R.ATTN_QKV, 1),
    ("model.layers.1.mlp.gate_up_proj.weight", R.MLP_GATE_UP, 1),
    ("model.norm.weight", R.OTHER, None),
    # Meta's original Llama names
    ("tok_embeddings.weight", R.EMBEDDING, None),
    ("layers.5.attention.wq.weight", R.ATTN_Q, 5),
    ("layers.5.attention.wo.weight", R.ATTN_O, 5),
    ("layers.5.feed_forward.w1.weight", R.MLP_GATE, 5),
    ("layers.5.feed_forward.w3.weight", R.MLP_UP, 5),
    ("layers.5.feed_forward.w2.weight", R.MLP_DOWN, 5),
    ("output.weight", R.LM_HEAD, None),
    # Falcon / Bloom / GPT-NeoX
    ("transformer.h.7.self_attention.query_key_value.weight", R.ATTN_QKV, 7),
    ("transformer.h.7.self_attention.dense.weight", R.ATTN_O, 7),
    ("transformer.h.7.mlp.dense_h_to_4h.weight", R.MLP_UP, 7),
    ("transformer.h.7.mlp.dense_4h_to_h.weight", R.MLP_DOWN, 7),
    ("gpt_neox.embed_in.weight", R.EMBEDDING, None),
    ("gpt_neox.layers.2.attention.query_key_value.weight", R.ATTN_QKV, 2),
    ("gpt_neox.layers.2.attention.dense.weight", R.ATTN_O, 2),
    ("embed_out.weight", R.LM_HEAD, None),
    # DeepSeek-V3 multi-head latent attention
    ("model.layers.1.self_attn.q_a_proj.weight", R.ATTN_Q, 1),
    ("model.layers.1.self_attn.q_b_proj.weight", R.ATTN_Q, 1),
    ("model.layers.1.self_attn.kv_a_proj_with_mqa.weight", R.ATTN_QKV, 1),
    ("model.layers.1.self_attn.kv_b_proj.weight", R.ATTN_QKV, 1),
    # ConvNeXt's pointwise-convolution MLP, Wav2Vec2's feed-forward, a module named `emb`
    ("convnext.encoder.stages.1.layers.2.pwconv1.weight", R.MLP_UP, 2),
    ("convnext.encoder.stages.1.layers.2.pwconv2.weight", R.MLP_DOWN, 2),
    ("wav2vec2.encoder.layers.3.feed_forward.intermediate_dense.weight", R.MLP_UP, 3),
    ("wav2vec2.encoder.layers.3.feed_forward.output_dense.weight", R.MLP_DOWN, 3),
    ("emb.weight", R.EMBEDDING, None),
    # OPT / GPT-J / MPT / DistilBERT
    ("model.decoder.embed_positions.weight", R.EMBEDDING, None),
    ("model.decoder.layers.4.self_attn.out_proj.weight", R.ATTN_O, 4),
    ("model.decoder.layers.4.fc1.weight", R.MLP_UP, 4),
    ("model.decoder.layers.4.fc2.weight", R.MLP_DOWN, 4),
    ("transformer.h.1.mlp.fc_in.weight", R.MLP_UP, 1),
    ("transformer.h.1.mlp.fc_out.weight", R.MLP_DOWN, 1),
    ("transformer.blocks.6.attn.Wqkv.weight", R.ATTN_QKV, 6),
    ("distilbert.transformer.layer.2.attention.q_lin.weight", R.ATTN_Q, 2),
    ("distilbert.transformer.layer.2.ffn.lin1.weight", R.MLP_UP, 2),
    ("distilbert.transformer.layer.2.ffn.lin2.weight", R.MLP_DOWN, 2),
    # T5: block index from block.N, not the sub-layer layer.M
    ("shared.weight", R.EMBEDDING, None),
    ("encoder.block.4.layer.0.SelfAttention.q.weight", R.ATTN_Q, 4),
    ("encoder.block.4.layer.0.SelfAttention.k.weight", R.ATTN_K, 4),
    ("encoder.block.4.layer.0.SelfAttention.v.weight", R.ATTN_V, 4),
    ("encoder.block.4.layer.0.SelfAttention.o.weight", R.ATTN_O, 4),
    ("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight", R.EMBEDDING, 0),
    ("decoder.block.2.layer.1.EncDecAttention.q.weight", R.ATTN_Q, 2),
    ("encoder.block.4.layer.1.DenseReluDense.wi.weight", R.MLP_UP, 4),
    ("encoder.block.4.layer.1.DenseReluDense.wi_0.weight", R.MLP_GATE, 4),
    ("encoder.block.4.layer.1.DenseReluDense.wi_1.weight", R.MLP_UP, 4),
    ("encoder.block.4.layer.1.DenseReluDense.wo.weight", R.MLP_DOWN, 4),
    # Mixtral and other MoE
    ("model.layers.9.block_sparse_moe.gate.weight", R.OTHER, 9),
    ("model.layers.9.block_sparse_moe.experts.3.w1.weight", R.MLP_GATE, 9),
    ("model.layers.9.block_sparse_moe.experts.3.w3.weight", R.MLP_UP, 9),
    ("model.layers.9.block_sparse_moe.experts.3.w2.weight", R.MLP_DOWN, 9),
    ("model.layers.9.mlp.experts.17.gate_proj.weight", R.MLP_GATE, 9),
    ("model.layers.9.mlp.experts.gate_up_proj", R.MLP_GATE_UP, 9),
    ("model.layers.9.mlp.experts.down_proj", R.MLP_DOWN, 9),
    ("model.layers.9.mlp.router.weight", R.OTHER, 9),
    ("model.layers.9.mlp.shared_expert_gate.weight", R.OTHER, 9),
    # Vision embeddings and unknowns
    ("vision_model.embeddings.patch_embedding.weight", R.EMBEDDING, None),
    ("some.custom.thing.weight", R.OTHER, None),
]


@pytest.mark.parametrize(("name", "role", "block"), CASES)
def test_classify(name: str, role: Role, block: int | None) -> None:
    assert classify(name) == (role, block)


def test_views_and_batches() -> None:
    targets, skipped = select(
        [
            entry("h.0.mlp.c_fc.weight", (64, 256)),
            entry("encoder.conv2d.weight", (32, 16, 3, 3)),
            entry("encoder.conv1.weight", (32, 16, 9)),  # "conv" in the name wins over k > 7
            entry("blocks.0.dw.weight", (32, 16, 3)),  # small last dim: a conv1d kernel
            entry("layers.0.mlp.experts.gate_up_proj", (8, 64, 4)),  # "expert": stacked
            entry("layers.0.stack.weight", (8, 64, 32)),
        ]
    )
    assert not skipped
    got = [(t.view, t.batch, t.matrix_shape) for t in targets]
    assert got == [
        (MatrixView.MATRIX, 1, (64, 256)),
        (MatrixView.CONV, 1, (32, 144)),
        (MatrixView.CONV, 1, (32, 144)),
        (MatrixView.CONV, 1, (32, 48)),
        (MatrixView.STACKED, 8, (64, 4)),
        (MatrixView.STACKED, 8, (64, 32)),
    ]


@pytest.mark.parametrize("shape", [(6, 10), (4, 3, 3, 3), (5, 6, 3), (3, 6, 10)])
def test_as_matrices_is_a_view(shape: tuple[int, ...]) -> None:
    (target,), _ = select([entry("experts.w" if len(shape) == 3 else "w", shape)])
    t = torch.arange(float(torch.tensor(shape).prod().item())).reshape(shape)
    mats = target.as_matrices(t)
    assert tuple(mats.shape) == (target.batch, *target.matrix_shape)
    # No copy: same storage, same first element.
    assert mats.untyped_storage().data_ptr() == t.untyped_storage().data_ptr()
    assert mats.data_ptr() == t.data_ptr()
    if len(shape) == 3 and target.view is MatrixView.STACKED:
        assert torch.equal(mats[1], t[1])


def test_as_matrices_rejects_a_wrong_shape() -> None:
    (target,), _ = select([entry("w", (4, 4))])
    with pytest.raises(ValueError, match="header shape"):
        target.as_matrices(torch.zeros(2, 8))


@pytest.mark.parametrize(
    ("shape", "dtype", "reason"),
    [
        ((), "F32", "scalar"),
        ((8,), "F32", "1-D tensor (bias or norm scale)"),
        ((0, 8), "F32", "empty tensor (a zero-sized dimension)"),
        ((8, 8), "I8", "integer dtype I8 (index data, or quantized without a scale tensor found)"),
        ((8, 8), "U8", "integer dtype U8 (index data, or quantized without a scale tensor found)"),
        (
            (8, 8),
            "I64",
            "integer dtype I64 (index data, or quantized without a scale tensor found)",
        ),
        ((8, 8), "BOOL", "BOOL dtype"),
        ((8, 8), "F8_E4M3", "F8_E4M3 (8-bit float without a scale tensor found)"),
        ((8, 8), "F4", "F4 (4-bit float without a scale)"),
        ((1, 8), "F32", "a dimension of 1 (stable rank is always 1)"),
    ],
)
def test_skip_reasons(shape: tuple[int, ...], dtype: str, reason: str) -> None:
    targets, skipped = select([entry("x.weight", shape, dtype)])
    assert targets == []
    assert [s.reason for s in skipped] == [reason]


@pytest.mark.parametrize("dtype", ["F16", "BF16", "F32", "F64"])
def test_float_dtypes_are_analysed(dtype: str) -> None:
    targets, skipped = select([entry("w", (4, 4), dtype)])
    assert len(targets) == 1 and not skipped


def test_include_and_exclude() -> None:
    entries = [
        entry("transformer.h.0.attn.c_attn.weight", (8, 24)),
        entry("transformer.h.0.mlp.c_fc.weight", (8, 32)),
        entry("transformer.h.1.mlp.c_fc.weight", (8, 32)),
        entry("transformer.wte.weight", (50, 8)),
    ]
    targets, skipped = select(entries, include=["*.mlp.*", "*wte*"], exclude=["*.h.1.*"])
    assert [t.entry.name for t in targets] == [
        "transformer.h.0.mlp.c_fc.weight",
        "transformer.wte.weight",
    ]
    reasons = {s.entry.name: s.reason for s in skipped}
    assert reasons == {
        "transformer.h.0.attn.c_attn.weight": "not matched by --include",
        "transformer.h.1.mlp.c_fc.weight": "excluded by --exclude '*.h.1.*'",
    }


def test_globs_are_case_sensitive() -> None:
    targets, _ = select([entry("Model.W", (4, 4))], include=["model.*"])
    assert targets == []


def test_targets_carry_role_and_block() -> None:
    (target,), _ = select([entry("model.layers.3.self_attn.q_proj.weight", (16, 16))])
    assert (target.role, target.block) == (Role.ATTN_Q, 3)


def test_checkpoint_metadata_modules_do_not_import_torch() -> None:
    code = (
        "import sys; import pss_cli.checkpoint.selection, pss_cli.checkpoint.discover; "
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[1])
