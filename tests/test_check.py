"""`pss check` policy (table-driven: report x policy -> findings), configuration and report loading.

Reports are built as JSON dicts (the saved-report form) and loaded through pss_cli.report_io, so
the same tests cover the loader; no torch anywhere in this file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pss_cli.errors import UsageError
from pss_cli.gate import (
    RULES,
    Policy,
    Severity,
    Thresholds,
    artifact_path,
    evaluate,
    merge,
    unreadable,
)
from pss_cli.policy import discover, load_policy
from pss_cli.report_io import is_report_path, load_report, report_from_json_dict
from pss_cli.results import ScanReport

CKPT = "models/run/model.safetensors"


def layer(name: str = "h.0.mlp.c_fc.weight", **fields: Any) -> dict[str, Any]:
    """A healthy 64 x 256 mlp_up matrix; `fields` override any JSON field."""
    row: dict[str, Any] = {
        "name": name,
        "index": None,
        "file": "model.safetensors",
        "shape": [64, 256],
        "matrix_shape": [64, 256],
        "dtype": "F32",
        "role": "mlp_up",
        "block": 0,
        "view": "matrix",
        "sigma_max": 0.8,
        "frobenius_norm": 2.6,
        "stable_rank": 10.7,
        "top_singular_values": [0.8] * 16,
        "topk_energy_share": 0.5,
        "sigma1_over_sigma2": 1.3,
        "entropy_effective_rank": None,
        "nonfinite_count": 0,
        "flags": [],
        "solver": "exact",
        "iterations": 0,
    }
    row.update(fields)
    return row


def report(*layers: dict[str, Any], checkpoint: str = CKPT) -> ScanReport:
    data = {"schema_version": 1, "checkpoint": checkpoint, "layers": list(layers)}
    return report_from_json_dict(data, "test")


def rule_ids(rep: ScanReport, policy: Policy | None = None, **kw: Any) -> list[str]:
    return [f.rule_id for f in evaluate(rep, policy or Policy(), **kw).findings]


# --- rules: each fires, and does not fire just inside its limit -----------------------------

CASES = [
    ("healthy", {}, []),
    (
        "nan",
        {
            "nonfinite_count": 3,
            "stable_rank": None,
            "sigma_max": None,
            "topk_energy_share": None,
            "sigma1_over_sigma2": None,
        },
        ["PSS001"],
    ),
    ("low stable rank", {"stable_rank": 1.27}, ["PSS003"]),
    ("stable rank at the floor", {"stable_rank": 5.0}, []),
    ("zero matrix: undefined, not low", {"stable_rank": None, "sigma_max": 0.0}, []),
    ("sigma ratio", {"sigma1_over_sigma2": 7.6}, ["PSS005"]),
    ("sigma ratio at the limit", {"sigma1_over_sigma2": 5.0}, []),
    ("energy", {"topk_energy_share": 0.886}, ["PSS006"]),
    (
        "energy where k covers the spectrum",
        {"matrix_shape": [16, 64], "topk_energy_share": 1.0},
        [],
    ),
    (
        "energy of a 32 x 32 matrix (top 16 are half its spectrum)",
        {"matrix_shape": [32, 32], "topk_energy_share": 0.889},
        [],
    ),
    (
        "energy of a 64 x 64 matrix (a quarter) is judged",
        {"matrix_shape": [64, 64], "topk_energy_share": 0.889},
        ["PSS006"],
    ),
    (
        "sigma ratio of a 2 x 2 matrix (37 % of random ones are above 5)",
        {"matrix_shape": [2, 2], "sigma1_over_sigma2": 9.0, "top_singular_values": [0.8, 0.1]},
        [],
    ),
    (
        "sigma ratio of an 8 x 64 matrix is judged",
        {"matrix_shape": [8, 64], "sigma1_over_sigma2": 9.0, "top_singular_values": [0.8] * 8},
        ["PSS005"],
    ),
    ("huge sigma_max: PSS004 off by default", {"sigma_max": 1e6}, []),
    (
        "collapse",
        {"stable_rank": 1.3, "sigma1_over_sigma2": 7.6, "topk_energy_share": 0.88},
        ["PSS003", "PSS005", "PSS006"],
    ),
]


@pytest.mark.parametrize(("case", "fields", "expected"), CASES, ids=[c[0] for c in CASES])
def test_rule_table(case: str, fields: dict[str, Any], expected: list[str]) -> None:
    assert rule_ids(report(layer(**fields))) == expected


def test_severity_order_and_verdict() -> None:
    rep = report(layer(stable_rank=1.3, sigma1_over_sigma2=7.0))
    result = evaluate(rep, Policy())
    assert [(f.rule_id, f.severity) for f in result.findings] == [
        ("PSS003", Severity.ERROR),
        ("PSS005", Severity.WARNING),
    ]
    assert (result.errors, result.warnings, result.passed) == (1, 1, False)
    warning_only = evaluate(report(layer(sigma1_over_sigma2=7.0)), Policy())
    assert warning_only.passed
    assert not evaluate(
        report(layer(sigma1_over_sigma2=7.0)), Policy(fail_on=Severity.WARNING)
    ).passed


def test_sigma_max_rule_when_configured() -> None:
    policy = Policy(thresholds=Thresholds(max_sigma_max=10.0))
    assert rule_ids(report(layer(sigma_max=12.0)), policy) == ["PSS004"]
    assert rule_ids(report(layer(sigma_max=9.0)), policy) == []


def test_rank_aware_floor_like_scan() -> None:
    # A 2 x 384 token-type embedding cannot exceed 2; an 8 x 64 matrix's floor is 8/4 = 2.
    small = layer(
        matrix_shape=[8, 64], role="attn_o", stable_rank=2.5, top_singular_values=[1.0] * 8
    )
    assert rule_ids(report(small)) == []
    finding = evaluate(report({**small, "stable_rank": 1.5}), Policy()).findings[0]
    assert finding.threshold == 2.0
    assert "lowered from 5 for min(m, n) = 8" in finding.message


def test_embeddings_have_their_own_defaults() -> None:
    emb = layer(
        "wte.weight",
        role="embedding",
        stable_rank=2.0,
        sigma1_over_sigma2=20.0,
        topk_energy_share=0.98,
    )
    assert rule_ids(report(emb)) == []
    assert rule_ids(report({**emb, "stable_rank": 1.2})) == ["PSS003"]


def test_unreadable_is_an_error_finding() -> None:
    result = unreadable("ckpt/model.safetensors", "truncated", Policy(), "checkpoint")
    assert [(f.rule_id, f.tensor, f.file) for f in result.findings] == [
        ("PSS002", None, "ckpt/model.safetensors")
    ]
    assert not result.passed
    assert unreadable("x", "y", Policy(ignore=frozenset({"PSS002"})), "checkpoint").passed


def test_rule_ids_are_unique_and_stable() -> None:
    assert [r.id for r in RULES] == [f"PSS{i:03d}" for i in range(1, 11)]


def test_artifact_path_and_fingerprint() -> None:
    assert artifact_path("a/b/model.safetensors", "model.safetensors") == "a/b/model.safetensors"
    assert artifact_path("a/sharded", "m-1.safetensors") == "a/sharded/m-1.safetensors"
    assert artifact_path("a/m.safetensors.index.json", "m-1.safetensors") == "a/m-1.safetensors"
    one = evaluate(report(layer(stable_rank=1.0)), Policy()).findings[0]
    two = evaluate(report(layer(stable_rank=2.0)), Policy()).findings[0]
    assert one.fingerprint == two.fingerprint  # value changes, the alert stays the same
    other = evaluate(report(layer("x", stable_rank=1.0)), Policy()).findings[0]
    assert other.fingerprint != one.fingerprint and len(one.fingerprint) == 64


def test_merge_several_models() -> None:
    a = evaluate(report(layer(), checkpoint="a/model.safetensors"), Policy())
    b = evaluate(report(layer(stable_rank=1.0), checkpoint="b/model.safetensors"), Policy())
    merged = merge([a, b])
    assert merged.files == ("a/model.safetensors", "b/model.safetensors")
    assert merged.layers_checked == 2 and not merged.passed


# --- baseline --------------------------------------------------------------------------------


def test_baseline_regressions_and_layer_changes() -> None:
    base = report(layer("a"), layer("b"), layer("gone"), layer("e", index=0), layer("e", index=1))
    now = report(
        layer("a", stable_rank=5.2),  # 10.7 -> 5.2: fell 51 % > 50 %
        layer("b", sigma_max=1.7),  # 0.8 -> 1.7: grew 112 % > 100 %
        layer("e", index=0, stable_rank=6.0),  # fell 44 %: within the limit
        layer("e", index=1),
        layer("new"),
    )
    found = {(f.rule_id, f.tensor) for f in evaluate(now, Policy(), base).findings}
    assert found == {("PSS007", "a"), ("PSS008", "b"), ("PSS009", "gone"), ("PSS010", "new")}
    severities = {f.rule_id: f.severity for f in evaluate(now, Policy(), base).findings}
    assert severities["PSS009"] is severities["PSS010"] is Severity.WARNING
    assert severities["PSS007"] is severities["PSS008"] is Severity.ERROR


def test_baseline_limits_are_configurable_and_null_safe() -> None:
    base = report(layer("a"), layer("z", stable_rank=None, sigma_max=0.0))
    now = report(layer("a", stable_rank=5.2), layer("z"))
    loose = Policy(thresholds=Thresholds(max_stable_rank_drop=0.6))
    assert rule_ids(now, loose, baseline=base) == []


# --- per-role / per-glob overrides and ignores ------------------------------------------------


def policy_from(toml: str, tmp_path: Path, **flags: Any) -> Policy:
    (tmp_path / "pss.toml").write_text(toml)
    return load_policy(tmp_path, None, {}, flags).policy


def test_role_group_role_and_glob_precedence(tmp_path: Path) -> None:
    policy = policy_from(
        """
        [roles.mlp]
        min_stable_rank = 2.0
        [roles.mlp_up]
        min_stable_rank = 3.0
        [per-tensor."h.1.*"]
        min_stable_rank = 1.0
        """,
        tmp_path,
    )
    rep = report(
        layer("h.0.up", stable_rank=2.5),  # mlp_up: 3.0 -> fires
        layer("h.0.down", role="mlp_down", stable_rank=2.5),  # group mlp: 2.0 -> passes
        layer("h.1.up", stable_rank=2.5),  # glob: 1.0 -> passes
        layer("h.0.q", role="attn_q", stable_rank=4.0),  # default 5 -> fires
    )
    assert [(f.rule_id, f.tensor) for f in evaluate(rep, policy).findings] == [
        ("PSS003", "h.0.q"),
        ("PSS003", "h.0.up"),
    ]


def test_ignores_global_role_and_glob(tmp_path: Path) -> None:
    policy = policy_from(
        """
        ignore = ["PSS006"]
        [roles.attention]
        ignore = ["PSS005"]
        [per-tensor-ignores]
        "*.embeddings.*" = ["PSS003"]
        """,
        tmp_path,
    )
    collapsed = {"stable_rank": 1.1, "sigma1_over_sigma2": 9.0, "topk_energy_share": 0.95}
    rep = report(
        layer("bert.embeddings.word.weight", **collapsed),
        layer("h.0.attn.q", role="attn_q", **collapsed),
    )
    assert {(f.rule_id, f.tensor) for f in evaluate(rep, policy).findings} == {
        ("PSS005", "bert.embeddings.word.weight"),
        ("PSS003", "h.0.attn.q"),
    }


def test_one_matrix_of_a_stack_is_configured_by_its_printed_name(tmp_path: Path) -> None:
    # `check` prints `experts.down_proj[1]` for matrix 1 of a stacked tensor: that name, or a
    # glob followed by [1], configures that matrix alone ([1] alone is a glob character class).
    policy = policy_from(
        """
        [per-tensor-ignores]
        "model.layers.0.mlp.experts.down_proj[1]" = ["PSS003"]
        "*.experts.up_proj[0]" = ["PSS003"]
        """,
        tmp_path,
    )
    collapsed = {"stable_rank": 1.1}
    rep = report(
        *(
            layer(f"model.layers.0.mlp.experts.{kind}", index=i, **collapsed)
            for kind in ("down_proj", "up_proj")
            for i in range(3)
        )
    )
    assert {(f.rule_id, f.tensor) for f in evaluate(rep, policy).findings} == {
        ("PSS003", "model.layers.0.mlp.experts.down_proj[0]"),
        ("PSS003", "model.layers.0.mlp.experts.down_proj[2]"),
        ("PSS003", "model.layers.0.mlp.experts.up_proj[1]"),
        ("PSS003", "model.layers.0.mlp.experts.up_proj[2]"),
    }


def test_user_role_table_refines_the_builtin_one(tmp_path: Path) -> None:
    policy = policy_from("[roles.embedding]\nmin_stable_rank = 1.0\n", tmp_path)
    emb = layer("wte", role="embedding", stable_rank=1.2, sigma1_over_sigma2=30.0)
    assert rule_ids(report(emb), policy) == []  # floor lowered, PSS005 still off for embeddings


# --- configuration: discovery, precedence, errors ---------------------------------------------


def test_precedence_flag_env_file_default(tmp_path: Path) -> None:
    (tmp_path / "pss.toml").write_text("min_stable_rank = 3.0\n")
    env = {"PSS_MIN_STABLE_RANK": "4.0"}
    assert Policy().thresholds.min_stable_rank == 5.0
    assert load_policy(tmp_path, None, {}, {}).policy.thresholds.min_stable_rank == 3.0
    assert load_policy(tmp_path, None, env, {}).policy.thresholds.min_stable_rank == 4.0
    flags = {"min_stable_rank": 2.0}
    assert load_policy(tmp_path, None, env, flags).policy.thresholds.min_stable_rank == 2.0


def test_env_fail_on_and_ignore_add_up(tmp_path: Path) -> None:
    (tmp_path / "pss.toml").write_text('ignore = ["PSS005"]\nfail_on = "error"\n')
    env = {"PSS_IGNORE": "PSS006, PSS004", "PSS_FAIL_ON": "warning"}
    policy = load_policy(tmp_path, None, env, {"ignore": ["PSS010"]}).policy
    assert policy.ignore == {"PSS004", "PSS005", "PSS006", "PSS010"}
    assert policy.fail_on is Severity.WARNING


@pytest.mark.parametrize(
    ("name", "value"),
    [("PSS_FAIL_ON", "sometimes"), ("PSS_IGNORE", "PSS999"), ("PSS_MIN_STABLE_RANK", "-1")],
)
def test_bad_environment_values_name_the_variable(tmp_path: Path, name: str, value: str) -> None:
    with pytest.raises(UsageError, match=rf"environment variable {name}\b"):
        load_policy(tmp_path, None, {name: value}, {})


def test_two_spellings_of_one_key_are_refused(tmp_path: Path) -> None:
    (tmp_path / "pss.toml").write_text("min-stable-rank = 3.0\nmin_stable_rank = 4.0\n")
    with pytest.raises(UsageError, match="given twice"):
        load_policy(tmp_path, None, {}, {})


def test_discovery_walks_up_and_skips_pyprojects_without_tool_pss(tmp_path: Path) -> None:
    (tmp_path / "pyproject.toml").write_text("[tool.pss]\nmax_sigma_ratio = 9.0\n")
    sub = tmp_path / "a" / "b"
    sub.mkdir(parents=True)
    (sub / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    found = discover(sub)
    assert found is not None and found[1] == tmp_path / "pyproject.toml"
    loaded = load_policy(sub, None, {}, {})
    assert loaded.policy.thresholds.max_sigma_ratio == 9.0
    (sub / "pss.toml").write_text("max_sigma_ratio = 7.0\n")  # nearer, and pss.toml wins
    assert load_policy(sub, None, {}, {}).policy.thresholds.max_sigma_ratio == 7.0


def test_explicit_config_file(tmp_path: Path) -> None:
    path = tmp_path / "pyproject.toml"
    path.write_text("[tool.pss]\nmax-topk-energy = 0.9\n")
    other = tmp_path / "elsewhere"
    other.mkdir()
    assert load_policy(other, path, {}, {}).policy.thresholds.max_topk_energy == 0.9


BAD_CONFIGS = [
    ("[tool.pss]\nmin_stable_rnak = 3\n", "unknown key 'tool.pss.min_stable_rnak'"),
    ("[tool.pss]\nmin_stable_rank = 'low'\n", "'min_stable_rank' must be a non-negative number"),
    ("[tool.pss]\nmin_stable_rank = true\n", "'min_stable_rank' must be a non-negative number"),
    ("[tool.pss]\nfail_on = 'fatal'\n", "'fail_on' must be error or warning"),
    ("[tool.pss]\nignore = ['PSS999']\n", "'ignore' names unknown rule 'PSS999'"),
    ("[tool.pss]\nignore = 'PSS003'\n", "'ignore' must be a list of rule ids"),
    ("[tool.pss.roles.embeding]\nmin_stable_rank = 1\n", "unknown role 'tool.pss.roles.embeding'"),
    ("[tool.pss.roles.embedding]\nmin_sr = 1\n", "unknown key 'tool.pss.roles.embedding.min_sr'"),
    ('[tool.pss.per-tensor-ignores]\n"*.x" = ["PSS01"]\n', "names unknown rule 'PSS01'"),
    ("[tool.pss\n", "is not valid TOML"),
]


@pytest.mark.parametrize(("text", "message"), BAD_CONFIGS)
def test_bad_config_is_a_usage_error_naming_the_key(
    tmp_path: Path, text: str, message: str
) -> None:
    (tmp_path / "pyproject.toml").write_text(text)
    with pytest.raises(UsageError) as caught:
        load_policy(tmp_path, None, {}, {})
    assert message in caught.value.message
    assert caught.value.exit_code == 2


def test_bad_env_and_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="PSS_MAX_SIGMA_MAX"):
        load_policy(tmp_path, None, {"PSS_MAX_SIGMA_MAX": "big"}, {})
    with pytest.raises(UsageError, match="does not exist"):
        load_policy(tmp_path, tmp_path / "nope.toml", {}, {})
    (tmp_path / "pyproject.toml").write_text("[project]\n")
    with pytest.raises(UsageError, match=r"no \[tool.pss\] table"):
        load_policy(tmp_path, tmp_path / "pyproject.toml", {}, {})


# --- saved reports ------------------------------------------------------------------------------


def test_report_round_trip_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "scan.json"
    path.write_text(json.dumps({"schema_version": 1, "checkpoint": CKPT, "layers": [layer()]}))
    assert is_report_path(path) and not is_report_path(tmp_path / "model.safetensors.index.json")
    loaded = load_report(path)
    assert loaded.layers[0].matrix_shape == (64, 256)


BAD_REPORTS = [
    ({"layers": []}, "not a pss scan report (no schema_version)"),
    ({"schema_version": 2, "checkpoint": "x", "layers": []}, "has schema_version 2"),
    ({"schema_version": 1, "command": "smooth"}, "is a `pss smooth` report"),
    ({"schema_version": 1, "checkpoint": "x"}, "has no 'layers' field"),
    (
        {"schema_version": 1, "checkpoint": "x", "layers": [{**layer(), "stable_rank": "1"}]},
        "layers[0].stable_rank must be a number or null",
    ),
    (
        {"schema_version": 1, "checkpoint": "x", "layers": [{"name": "w"}]},
        "layers[0] has no 'matrix_shape' field",
    ),
]


@pytest.mark.parametrize(("data", "message"), BAD_REPORTS)
def test_bad_reports_are_usage_errors(data: dict[str, Any], message: str) -> None:
    with pytest.raises(UsageError) as caught:
        report_from_json_dict(data, "r.json")
    assert message in caught.value.message
