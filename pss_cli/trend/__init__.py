"""`pss trend` as a library: ``analyse_run(paths, ScanConfig(), TrendConfig())`` -> TrendReport.

Torch-free to import (scans import torch lazily), so ``from pss_cli.trend import analyse_run``
costs nothing until a checkpoint is actually scanned.
"""

from __future__ import annotations

from pss_cli.trend.analysis import analyse_run, default_cache_dir
from pss_cli.trend.series import TrendReport, trend_to_json_dict

__all__ = ["TrendReport", "analyse_run", "default_cache_dir", "trend_to_json_dict"]
