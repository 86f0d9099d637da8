"""Renderers of a `pss check` result: text, json, sarif, junit, github, markdown.

Stdlib only (no rich, no torch): `pss check report.json` must stay light. One function per
format, dispatched through a registry.
"""

from __future__ import annotations

import json
import re
import xml.etree.ElementTree as ET
from collections.abc import Callable
from enum import StrEnum
from typing import Any
from urllib.parse import quote

from pss_cli.errors import count, printable
from pss_cli.gate import RULES, CheckResult, Finding, Severity
from pss_cli.report.formats import renderer_for

SARIF_SCHEMA = "https://json.schemastore.org/sarif-2.1.0.json"
# GitHub shows at most 10 error and 10 warning annotations per step (docs/DESIGN.md, CI);
# the rest would be dropped silently, so pss cuts them itself and says how many it cut.
GITHUB_ANNOTATION_CAP = 10
CHECK_SCHEMA_VERSION = 1


class CheckFormat(StrEnum):
    TEXT = "text"
    JSON = "json"
    SARIF = "sarif"
    JUNIT = "junit"
    GITHUB = "github"
    MARKDOWN = "markdown"


def verdict_line(result: CheckResult) -> str:
    verdict = "passed" if result.passed else "failed"
    source = f" against baseline {result.baseline}" if result.baseline else ""
    return (
        f"pss check {verdict}: {count(result.errors, 'error')}, "
        f"{count(result.warnings, 'warning')} in "
        f"{count(result.layers_checked, 'matrix', 'matrices')} of {result.checkpoint}{source} "
        f"(--fail-on {result.fail_on})"
    )


def render_text(result: CheckResult) -> str:
    lines = [
        f"{f.file}: {f.tensor or '-'}: {f.rule_id} [{f.severity}] {f.message}"
        for f in result.findings
    ]
    # Names come from the files: escaped, a newline in a tensor name cannot start a line of its
    # own (on GitHub Actions a line starting with `::error::` is a workflow command).
    return "\n".join(printable(line) for line in [*lines, verdict_line(result)]) + "\n"


def result_to_json_dict(result: CheckResult) -> dict[str, Any]:
    return {
        "schema_version": CHECK_SCHEMA_VERSION,
        "command": "check",
        "pss_version": result.pss_version,
        "checkpoint": result.checkpoint,
        "input": result.input_kind,
        "baseline": result.baseline,
        "fail_on": str(result.fail_on),
        "passed": result.passed,
        "summary": {
            "errors": result.errors,
            "warnings": result.warnings,
            "matrices": result.layers_checked,
        },
        "findings": [
            {
                "rule": f.rule_id,
                "severity": str(f.severity),
                "file": f.file,
                "tensor": f.tensor,
                "role": f.role,
                "message": f.message,
                "value": f.value,
                "threshold": f.threshold,
                "fingerprint": f.fingerprint,
            }
            for f in result.findings
        ],
    }


def render_json(result: CheckResult) -> str:
    return json.dumps(result_to_json_dict(result), indent=2, allow_nan=False) + "\n"


def _finding_text(finding: Finding) -> str:
    return f"{finding.tensor}: {finding.message}" if finding.tensor else finding.message


def render_sarif(result: CheckResult) -> str:
    """SARIF 2.1.0 with what GitHub code scanning needs: a rule per check, a location with a
    region (the file has no lines: line 1), and partialFingerprints that survive re-runs."""
    rules = [
        {
            "id": rule.id,
            "name": rule.name,
            "shortDescription": {"text": rule.summary},
            "fullDescription": {"text": rule.summary},
            "help": {"text": rule.help},
            "defaultConfiguration": {"level": str(rule.severity)},
        }
        for rule in RULES
    ]
    results = [
        {
            "ruleId": f.rule_id,
            "ruleIndex": next(i for i, rule in enumerate(RULES) if rule.id == f.rule_id),
            "level": str(f.severity),
            "message": {"text": _finding_text(f)},
            "locations": [
                {
                    "physicalLocation": {
                        "artifactLocation": {"uri": quote(f.file, safe="/")},
                        "region": {"startLine": 1},
                    },
                    **({"logicalLocations": [{"name": f.tensor}]} if f.tensor else {}),
                }
            ],
            "partialFingerprints": {"pssFinding/v1": f.fingerprint},
        }
        for f in result.findings
    ]
    driver = {
        "name": "pss",
        "version": result.pss_version,
        "informationUri": "https://arxiv.org/abs/2602.01308",
        "rules": rules,
    }
    sarif = {
        "$schema": SARIF_SCHEMA,
        "version": "2.1.0",
        "runs": [{"tool": {"driver": driver}, "results": results}],
    }
    return json.dumps(sarif, indent=2, allow_nan=False) + "\n"


# Characters XML 1.0 forbids (tensor names may hold control characters).
_XML_ILLEGAL = re.compile("[^\x09\x0a\x0d\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _xml_safe(text: str) -> str:
    return _XML_ILLEGAL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


def render_junit(result: CheckResult) -> str:
    """One test case per (file, rule); a failure for findings at or above --fail-on, the
    findings below it listed in the case's system-out (JUnit has no "warning" state)."""
    rules = [rule for rule in RULES if rule.id not in result.ignored_rules]
    suite = ET.Element("testsuite", name="pss check")
    failures = 0
    # Every file a finding names gets its cases, so no finding can fall outside the suite.
    files = sorted(set(result.files) | {f.file for f in result.findings})
    for file in files:
        for rule in rules:
            case = ET.SubElement(
                suite, "testcase", classname=_xml_safe(file), name=f"{rule.id} {rule.name}"
            )
            found = [f for f in result.findings if f.file == file and f.rule_id == rule.id]
            if not found:
                continue
            body = _xml_safe("\n".join(_finding_text(f) for f in found))
            if rule.severity.rank >= result.fail_on.rank:
                failures += 1
                message = f"{len(found)} {rule.severity} finding(s): {rule.summary}"
                failure = ET.SubElement(case, "failure", message=message, type=rule.id)
                failure.text = body
            else:
                ET.SubElement(case, "system-out").text = body
    suite.set("tests", str(len(suite)))
    suite.set("failures", str(failures))
    suite.set("errors", "0")
    suites = ET.Element("testsuites", name="pss", tests=suite.get("tests", "0"))
    suites.set("failures", str(failures))
    suites.append(suite)
    ET.indent(suites)
    return '<?xml version="1.0" encoding="utf-8"?>\n' + ET.tostring(suites, "unicode") + "\n"


def _escape_data(text: str) -> str:
    # GitHub workflow-command escaping (actions/toolkit, command.ts).
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _escape_property(text: str) -> str:
    return _escape_data(text).replace(":", "%3A").replace(",", "%2C")


def render_github(result: CheckResult) -> str:
    lines: list[str] = []
    shown = {Severity.ERROR: 0, Severity.WARNING: 0}
    for f in result.findings:
        if shown[f.severity] >= GITHUB_ANNOTATION_CAP:
            continue
        shown[f.severity] += 1
        props = f"file={_escape_property(f.file)},title={_escape_property(f.rule_id)}"
        lines.append(f"::{f.severity} {props}::{_escape_data(_finding_text(f))}")
    cut = len(result.findings) - sum(shown.values())
    if cut:
        lines.append(
            f"::notice title=pss check::{cut} more findings not shown as annotations "
            f"(GitHub shows {GITHUB_ANNOTATION_CAP} errors and {GITHUB_ANNOTATION_CAP} warnings "
            "per step); the job summary lists them all"
        )
    lines.append(verdict_line(result))
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(result: CheckResult) -> str:
    verdict = "passed" if result.passed else "failed"
    lines = [f"## pss check {verdict}", "", verdict_line(result), ""]
    if result.findings:
        lines += ["| severity | rule | file | tensor | message |", "|---|---|---|---|---|"]
        lines += [
            f"| {f.severity} | {f.rule_id} | {_cell(f.file)} | {_cell(f.tensor or '-')} "
            f"| {_cell(f.message)} |"
            for f in result.findings
        ]
    else:
        lines.append("No findings.")
    return "\n".join(lines) + "\n"


_RENDERERS: dict[CheckFormat, Callable[[CheckResult], str]] = {
    CheckFormat.TEXT: render_text,
    CheckFormat.JSON: render_json,
    CheckFormat.SARIF: render_sarif,
    CheckFormat.JUNIT: render_junit,
    CheckFormat.GITHUB: render_github,
    CheckFormat.MARKDOWN: render_markdown,
}


def render_check(result: CheckResult, output_format: CheckFormat) -> str:
    return renderer_for("check", _RENDERERS, output_format)(result)
