"""Versioned JSON report (schema in pss_cli.results)."""

from __future__ import annotations

import json

from pss_cli.results import ScanReport, report_to_json_dict


def render_json(report: ScanReport) -> str:
    # allow_nan=False: a NaN that slipped through is a bug to see, not invalid JSON to ship.
    return json.dumps(report_to_json_dict(report), indent=2, allow_nan=False) + "\n"
