"""The gate's vocabulary for `pss check`: rules, thresholds, policy, findings and the result.

`pss_cli.gate` re-exports every name here; the checks are in pss_cli/gate_findings.py.

No files, no printing, no torch: the same code gates a fresh scan and a saved JSON report, and the
tests drive it with hand-built reports. Rule ids are stable (PSS001...): CI configs, SARIF alerts
and ignore lists refer to them, so an id is never reused for another meaning.

Defaults and their reasons (docs/DESIGN.md, measured with `pss scan`):
- stable rank: the paper (arXiv 2602.01308) sees GPT-2 FFN matrices at ~50-130 in stable runs and
  below ~5 right before a loss explosion; a healthy all-MiniLM-L6-v2 has FFN matrices at 10-24.
  5 (scan's own flag) catches a collapse without flagging healthy small models.
- sigma_1/sigma_2: <= 1.74 on every non-embedding MiniLM matrix and <= 1.34 on the healthy sample;
  7.3-7.7 on the three collapsed matrices of the diverged sample. 5 sits between them (warning).
- top-k energy share: <= 0.35 on every non-embedding MiniLM matrix, <= 0.56 on the healthy
  sample's 64-wide matrices (top-16 of 64 values is a large share by construction), 0.84-0.89 on
  the collapsed ones. 0.8 sits between them (warning); not applied where 4k > min(m, n), where
  the top k are a large part of any spectrum (a random 32 x 32 matrix's top 16: 0.90). The
  sigma_1/sigma_2 rule is not applied below a short side of 8 (random 2 x 2: above 5 in 37 %).
- sigma_max: its scale depends on the architecture, init and normalisation: no universal number,
  so the rule is off unless configured.
- baseline: a collapse is a > 90 % stable-rank drop (50-130 -> < 5); a halving (50 %) is flagged
  long before that. sigma_max doubling (growth 100 %) is flagged: the paper sees sigma_1 grow as
  the spectrum collapses (the diverged sample's collapsed matrices grew ~5-6x).
- embeddings and lm_head legitimately have low stable ranks and a dominant direction (MiniLM's
  position embeddings: stable rank 7.7, top-16 energy 0.98; token-type: s1/s2 5.8): their floor
  is 1.5 (only a near rank-one matrix fails) and the s1/s2 and energy rules are off for them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field, fields, replace
from enum import StrEnum

from pss_cli import __version__
from pss_cli.config import DEFAULT_MIN_STABLE_RANK, MIN_STABLE_RANK_FRACTION_OF_RANK
from pss_cli.results import name_matches


class Severity(StrEnum):
    WARNING = "warning"
    ERROR = "error"

    @property
    def rank(self) -> int:
        return 2 if self is Severity.ERROR else 1


@dataclass(frozen=True)
class Rule:
    id: str
    name: str  # kebab-case, as SARIF's rule name
    severity: Severity
    summary: str  # one line (SARIF shortDescription)
    help: str  # what to do about it (SARIF help)


RULES: tuple[Rule, ...] = (
    Rule(
        "PSS001",
        "nonfinite-weights",
        Severity.ERROR,
        "Weight matrix holds NaN or Inf",
        "Resume from an earlier checkpoint; NaN/Inf weights cannot be repaired by smoothing.",
    ),
    Rule(
        "PSS002",
        "unreadable-checkpoint",
        Severity.ERROR,
        "Checkpoint unreadable, corrupt or incomplete",
        "Check the file or shards exist and were written completely (a killed save "
        "truncates them); `pss scan` names the failing file.",
    ),
    Rule(
        "PSS003",
        "low-stable-rank",
        Severity.ERROR,
        "Stable rank below the minimum",
        "The spectrum collapsed onto a few directions, as before a loss explosion "
        "(arXiv 2602.01308); resume from an earlier checkpoint or repair with `pss smooth`.",
    ),
    Rule(
        "PSS004",
        "high-sigma-max",
        Severity.WARNING,
        "Largest singular value above the maximum",
        "A runaway sigma_max amplifies activations; lower the learning rate or inspect the layer.",
    ),
    Rule(
        "PSS005",
        "dominant-singular-value",
        Severity.WARNING,
        "sigma_1 / sigma_2 above the maximum",
        "One direction dominates the matrix; watch the stable rank of this layer.",
    ),
    Rule(
        "PSS006",
        "concentrated-energy",
        Severity.WARNING,
        "Top-k singular values hold too much of the energy",
        "The spectrum concentrates in a few values; watch the stable rank of this layer.",
    ),
    Rule(
        "PSS007",
        "stable-rank-regression",
        Severity.ERROR,
        "Stable rank dropped against the baseline",
        "Compare the training runs; a large drop precedes collapse (arXiv 2602.01308).",
    ),
    Rule(
        "PSS008",
        "sigma-max-regression",
        Severity.ERROR,
        "sigma_max grew against the baseline",
        "Compare the training runs; sigma_1 grows as a spectrum collapses.",
    ),
    Rule(
        "PSS009",
        "layer-missing",
        Severity.WARNING,
        "Layer in the baseline but not in the model",
        "Check that the right checkpoint and baseline are compared.",
    ),
    Rule(
        "PSS010",
        "layer-new",
        Severity.WARNING,
        "Layer in the model but not in the baseline",
        "Check that the right checkpoint and baseline are compared.",
    ),
)
RULES_BY_ID: dict[str, Rule] = {rule.id: rule for rule in RULES}


@dataclass(frozen=True)
class Thresholds:
    """One value per rule with a number; None switches that rule off."""

    min_stable_rank: float | None = DEFAULT_MIN_STABLE_RANK  # PSS003
    max_sigma_max: float | None = None  # PSS004
    max_sigma_ratio: float | None = 5.0  # PSS005
    max_topk_energy: float | None = 0.8  # PSS006
    max_stable_rank_drop: float | None = 0.5  # PSS007, relative: 0.5 = halved
    max_sigma_max_growth: float | None = 1.0  # PSS008, relative: 1.0 = doubled


THRESHOLD_NAMES: tuple[str, ...] = tuple(f.name for f in fields(Thresholds))


@dataclass(frozen=True)
class Override:
    """Thresholds and ignored rules for a role or a tensor-name glob."""

    values: tuple[tuple[str, float], ...] = ()  # (Thresholds field, value)
    ignore: frozenset[str] = frozenset()


ROLE_GROUPS: dict[str, str] = {"attention": "attn_", "mlp": "mlp_"}  # group key -> role prefix
_EMBEDDING_LIKE = Override((("min_stable_rank", 1.5),), frozenset({"PSS005", "PSS006"}))
BUILTIN_ROLE_OVERRIDES: tuple[tuple[str, Override], ...] = (
    ("embedding", _EMBEDDING_LIKE),
    ("lm_head", _EMBEDDING_LIKE),
)


@dataclass(frozen=True)
class Policy:
    thresholds: Thresholds = field(default_factory=Thresholds)
    ignore: frozenset[str] = frozenset()
    roles: tuple[tuple[str, Override], ...] = BUILTIN_ROLE_OVERRIDES
    per_tensor: tuple[tuple[str, Override], ...] = ()  # (glob, override), later wins
    fail_on: Severity = Severity.ERROR
    # scan's rank-aware floor (pss_cli.thresholds.stable_rank_floor)
    rank_fraction: float = MIN_STABLE_RANK_FRACTION_OF_RANK

    def for_layer(
        self, name: str, role: str, index: int | None = None
    ) -> tuple[Thresholds, frozenset[str]]:
        """Thresholds and ignores for one layer (matrix `index` of a stacked tensor): defaults
        < role group < role < globs, which may name one matrix as `check` prints it (`x[2]`)."""
        thresholds, ignore = self.thresholds, self.ignore
        for override in self._matching(name, role, index):
            thresholds = replace(thresholds, **dict(override.values))
            ignore = ignore | override.ignore
        return thresholds, ignore

    def _matching(self, name: str, role: str, index: int | None) -> Iterator[Override]:
        yield from (
            o for key, o in self.roles if key in ROLE_GROUPS and role.startswith(ROLE_GROUPS[key])
        )
        yield from (o for key, o in self.roles if key == role)
        yield from (o for glob, o in self.per_tensor if name_matches(name, index, glob))


@dataclass(frozen=True)
class Finding:
    rule_id: str
    severity: Severity
    file: str  # the checkpoint file, as a posix path relative to where the checkpoint was named
    tensor: str | None  # display name (`name[i]` for one matrix of a stack); None: whole file
    role: str | None
    message: str
    value: float | None = None
    threshold: float | None = None

    @property
    def fingerprint(self) -> str:
        """Stable across runs (SARIF partialFingerprints): file + tensor + rule only."""
        key = f"{self.file}\0{self.tensor or ''}\0{self.rule_id}"
        return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class CheckResult:
    checkpoint: str
    input_kind: str  # "checkpoint" or "report"
    baseline: str | None
    fail_on: Severity
    files: tuple[str, ...]  # the checkpoint files checked (artifact paths)
    layers_checked: int
    findings: tuple[Finding, ...]
    ignored_rules: frozenset[str] = frozenset()  # ignored everywhere (left out of JUnit cases)
    pss_version: str = __version__
    # The policy's per-tensor keys that named no analysed matrix: a typo there silently
    # configured nothing (the CLI warns on stderr).
    unmatched_globs: tuple[str, ...] = ()
    # Weight files beside or below the checkpoint that it does not include (a sentence-
    # transformers 2_Dense/, a shard the index does not name), as (file, why): the gate says
    # so on stderr rather than pass them in silence.
    not_checked: tuple[tuple[str, str], ...] = ()

    @property
    def errors(self) -> int:
        return sum(f.severity is Severity.ERROR for f in self.findings)

    @property
    def warnings(self) -> int:
        return sum(f.severity is Severity.WARNING for f in self.findings)

    @property
    def passed(self) -> bool:
        return not any(f.severity.rank >= self.fail_on.rank for f in self.findings)
