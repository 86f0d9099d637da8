"""Pure policy for `pss check`: a scan report x thresholds -> findings and a verdict.

No files, no printing, no torch: the same code gates a fresh scan and a saved JSON report, and the
tests drive it with hand-built reports. Rule ids are stable (PSS001...): CI configs, SARIF alerts
and ignore lists refer to them, so an id is never reused for another meaning.

This module evaluates (`evaluate`, `unreadable`, `merge`) and re-exports the names other code
imports from here: the rules, thresholds (with the reasons for their defaults) and result types
are in pss_cli/gate_rules.py, the per-layer and baseline checks in pss_cli/gate_findings.py.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from pss_cli.checkpoint.selection import is_unanalysed_weight
from pss_cli.gate_findings import artifact_path, baseline_findings, layer_findings
from pss_cli.gate_rules import (
    BUILTIN_ROLE_OVERRIDES,
    ROLE_GROUPS,
    RULES,
    RULES_BY_ID,
    THRESHOLD_NAMES,
    CheckResult,
    Finding,
    Override,
    Policy,
    Rule,
    Severity,
    Thresholds,
)
from pss_cli.results import ScanReport, name_matches, weights_left_out

__all__ = [
    "BUILTIN_ROLE_OVERRIDES",
    "ROLE_GROUPS",
    "RULES",
    "RULES_BY_ID",
    "THRESHOLD_NAMES",
    "CheckResult",
    "Finding",
    "Override",
    "Policy",
    "Rule",
    "Severity",
    "Thresholds",
    "artifact_path",
    "evaluate",
    "merge",
    "unreadable",
]


def evaluate(
    report: ScanReport,
    policy: Policy,
    baseline: ScanReport | None = None,
    *,
    input_kind: str = "checkpoint",
    baseline_name: str | None = None,
) -> CheckResult:
    findings = [f for layer in report.layers for f in layer_findings(report, layer, policy)]
    if not report.layers and "PSS002" not in policy.ignore:
        # A gate must not pass a model it could not look at (an empty index, every tensor
        # skipped or excluded): that is a broken or mis-specified save.
        rule = RULES_BY_ID["PSS002"]
        tensors = [s for s in report.skipped if s.name]
        why = (
            f"all {len(tensors)} tensors skipped, e.g. '{tensors[0].name}': {tensors[0].reason}"
            if tensors
            else "no 2-D float tensors found"
        )
        findings.append(
            Finding(
                rule.id,
                rule.severity,
                report.checkpoint.replace("\\", "/"),
                None,
                None,
                f"no weight matrix was analysed ({why})",
            )
        )
    if baseline is not None:
        findings.extend(baseline_findings(report, baseline, policy))
    return CheckResult(
        checkpoint=report.checkpoint,
        input_kind=input_kind,
        baseline=baseline_name,
        fail_on=policy.fail_on,
        files=tuple(
            sorted(
                {artifact_path(report.checkpoint, la.file, report.layout) for la in report.layers}
            )
        ),
        layers_checked=len(report.layers),
        findings=tuple(sorted(findings, key=_order)),
        ignored_rules=policy.ignore,
        unmatched_globs=tuple(
            dict.fromkeys(
                glob
                for glob, _ in policy.per_tensor
                if report.layers
                and not any(name_matches(x.name, x.index, glob) for x in report.layers)
            )
        ),
        not_checked=tuple((s.file, s.reason) for s in report.skipped if weights_left_out(s))
        + tuple(
            (f"{s.file}: {s.name}", s.reason)
            for s in report.skipped
            if s.name and is_unanalysed_weight(s.shape, s.reason)
        ),
    )


def unreadable(checkpoint: str, reason: str, policy: Policy, input_kind: str) -> CheckResult:
    """An unreadable checkpoint is a finding (PSS002, exit 1), not a crash: the model is broken."""
    rule = RULES_BY_ID["PSS002"]
    findings = (
        ()
        if rule.id in policy.ignore
        else (Finding(rule.id, rule.severity, checkpoint.replace("\\", "/"), None, None, reason),)
    )
    return CheckResult(
        checkpoint, input_kind, None, policy.fail_on, (checkpoint,), 0, findings, policy.ignore
    )


def merge(results: Sequence[CheckResult]) -> CheckResult:
    """Several models checked in one run (pre-commit passes every changed file): one verdict."""
    first = results[0]
    if len(results) == 1:
        return first
    kinds = {r.input_kind for r in results}
    return replace(
        first,
        checkpoint=", ".join(r.checkpoint for r in results),
        input_kind=first.input_kind if len(kinds) == 1 else "mixed",
        files=tuple(sorted({file for r in results for file in r.files})),
        layers_checked=sum(r.layers_checked for r in results),
        findings=tuple(sorted((f for r in results for f in r.findings), key=_order)),
        # A key may name one model's matrices: it is unmatched only if no model has them.
        unmatched_globs=tuple(
            g for g in first.unmatched_globs if all(g in r.unmatched_globs for r in results)
        ),
        not_checked=tuple(dict.fromkeys(x for r in results for x in r.not_checked)),
    )


def _order(finding: Finding) -> tuple[int, str, str, str]:
    return (-finding.severity.rank, finding.rule_id, finding.file, finding.tensor or "")
