"""Configuration of `pss check`: built-in defaults < config file < environment < command line.

The file is `[tool.pss]` in a `pyproject.toml` or the top level of a `pss.toml`, found from the
working directory upward (in each folder `pss.toml` wins; a `pyproject.toml` without `[tool.pss]`
is passed over, as ruff does), or named with `--config FILE`. Keys may be spelt with `-` or `_`.

```toml
[tool.pss]
min_stable_rank = 5.0        # any Thresholds field of pss_cli.gate
fail_on = "error"            # or "warning"
ignore = ["PSS005"]          # rules off everywhere

[tool.pss.roles.embedding]   # a role from scan, or the groups "attention" / "mlp"
min_stable_rank = 1.0
ignore = ["PSS006"]

[tool.pss.per-tensor."*.c_attn.*"]   # fnmatch glob on the tensor name; later globs win
max_sigma_ratio = 8.0

[tool.pss.per-tensor-ignores]
"*.embeddings.*" = ["PSS003"]
```

Anything unknown or malformed is a UsageError (exit 2) naming the key: a typo in a CI gate must
not silently loosen it. Torch-free.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pss_cli.checkpoint.selection import Role
from pss_cli.errors import UsageError
from pss_cli.gate import (
    ROLE_GROUPS,
    RULES_BY_ID,
    THRESHOLD_NAMES,
    Override,
    Policy,
    Severity,
)

ROLE_KEYS = frozenset({str(role) for role in Role} | set(ROLE_GROUPS))
TOP_LEVEL_KEYS = frozenset(
    {*THRESHOLD_NAMES, "fail_on", "ignore", "roles", "per_tensor", "per_tensor_ignores"}
)
ENV_PREFIX = "PSS_"


@dataclass(frozen=True)
class LoadedPolicy:
    policy: Policy
    source: Path | None  # the config file used, if any


def load_policy(
    cwd: Path,
    config_file: Path | None,
    env: Mapping[str, str],
    flags: Mapping[str, Any],
) -> LoadedPolicy:
    """`flags`: Thresholds field names, `fail_on` and `ignore`; None or empty means "not given"."""
    found = _read_file(config_file) if config_file is not None else discover(cwd)
    table, source = found if found is not None else ({}, None)
    where = str(source) if source is not None else "config"
    prefix = "tool.pss." if source is not None and source.name == "pyproject.toml" else ""
    policy = apply_table(Policy(), table, where, prefix)
    for name, values in _env_values(env).items():
        # One variable at a time, so that an error names the variable (PSS_FAIL_ON), not a key.
        policy = _apply_scalars(policy, values, f"environment variable {name}")
    policy = _apply_scalars(
        policy, {k: v for k, v in flags.items() if v not in (None, [], ())}, "command line"
    )
    return LoadedPolicy(policy, source)


def discover(start: Path) -> tuple[dict[str, Any], Path] | None:
    """The nearest `pss.toml`, or `pyproject.toml` with `[tool.pss]`, from `start` upward."""
    for folder in (start.resolve(), *start.resolve().parents):
        for name in ("pss.toml", "pyproject.toml"):
            path = folder / name
            if path.is_file():
                found = _read_file(path, required=name == "pss.toml")
                if found is not None:
                    return found
    return None


def _read_file(path: Path, required: bool = True) -> tuple[dict[str, Any], Path] | None:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"config file '{path}' does not exist", "check --config") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read config file '{path}': {exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"config file '{path}' is not valid TOML: {exc}") from exc
    if path.name != "pyproject.toml":
        return data, path
    table = data.get("tool", {}).get("pss") if isinstance(data.get("tool"), dict) else None
    if table is None:
        if required:
            raise UsageError(f"'{path}' has no [tool.pss] table", "add one or name a pss.toml")
        return None
    if not isinstance(table, dict):
        raise UsageError(f"'{path}': tool.pss must be a table")
    return table, path


def apply_table(
    policy: Policy, table: Mapping[str, Any], where: str, prefix: str = "tool.pss."
) -> Policy:
    """A parsed `[tool.pss]` table on top of `policy`; every key validated. `prefix` spells
    keys in messages as the file does (`tool.pss.` in pyproject.toml, nothing in pss.toml)."""
    table = _normalised(table, where, TOP_LEVEL_KEYS, prefix)
    policy = _apply_scalars(
        policy,
        {k: v for k, v in table.items() if k in THRESHOLD_NAMES or k in {"fail_on", "ignore"}},
        where,
    )
    roles = _mapping(table.get("roles", {}), where, f"{prefix}roles")
    user_roles = tuple(
        (_role_key(key, where, prefix), _override(value, where, f"{prefix}roles.{key}."))
        for key, value in roles.items()
    )
    globs = _mapping(table.get("per_tensor", {}), where, f"{prefix}per-tensor")
    per_tensor = [
        (glob, _override(v, where, f'{prefix}per-tensor."{glob}".')) for glob, v in globs.items()
    ]
    ignores = _mapping(table.get("per_tensor_ignores", {}), where, f"{prefix}per-tensor-ignores")
    per_tensor += [
        (glob, Override((), _rule_ids(v, where, f'{prefix}per-tensor-ignores."{glob}"')))
        for glob, v in ignores.items()
    ]
    return replace(
        policy,
        roles=_merge_roles(policy.roles, user_roles),
        per_tensor=policy.per_tensor + tuple(per_tensor),
    )


def _merge_roles(
    base: Sequence[tuple[str, Override]], user: Sequence[tuple[str, Override]]
) -> tuple[tuple[str, Override], ...]:
    """A user's role table refines the built-in one (e.g. embedding keeps PSS005 off unless the
    user's table names another set of ignores: ignores add up, values replace)."""
    merged = dict(base)
    for key, override in user:
        old = merged.get(key, Override())
        values = dict(old.values) | dict(override.values)
        merged[key] = Override(tuple(values.items()), old.ignore | override.ignore)
    return tuple(merged.items())


def _apply_scalars(policy: Policy, values: Mapping[str, Any], where: str) -> Policy:
    thresholds = {k: _number(v, where, k) for k, v in values.items() if k in THRESHOLD_NAMES}
    changes: dict[str, Any] = {"thresholds": replace(policy.thresholds, **thresholds)}
    if "fail_on" in values:
        changes["fail_on"] = _severity(values["fail_on"], where)
    if "ignore" in values:
        # Ignores add up across sources: a flag adds a rule to the file's list, never drops one.
        changes["ignore"] = policy.ignore | _rule_ids(values["ignore"], where, "ignore")
    return replace(policy, **changes)


def _env_values(env: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """PSS_MIN_STABLE_RANK=3, PSS_FAIL_ON=warning, PSS_IGNORE=PSS005,PSS006 (others ignored:
    PSS_DEBUG and friends belong to other features), by variable name."""
    values: dict[str, dict[str, Any]] = {}
    for key in (*THRESHOLD_NAMES, "fail_on", "ignore"):
        name = ENV_PREFIX + key.upper()
        if name not in env:
            continue
        raw = env[name]
        if key == "ignore":
            values[name] = {key: [part.strip() for part in raw.split(",") if part.strip()]}
        elif key in THRESHOLD_NAMES:
            values[name] = {key: _parse_env_number(raw, name)}
        else:
            values[name] = {key: raw}
    return values


def _parse_env_number(raw: str, name: str) -> float:
    try:
        return float(raw)
    except ValueError:
        raise UsageError(f"environment variable {name}={raw!r} is not a number") from None


def _normalised(table: Any, where: str, allowed: frozenset[str], prefix: str) -> dict[str, Any]:
    table = _mapping(table, where, prefix.rstrip(".") or "the top level")
    out: dict[str, Any] = {}
    for key, value in table.items():
        norm = key.replace("-", "_")
        if norm not in allowed:
            known = ", ".join(sorted(k.replace("_", "-") if "per" in k else k for k in allowed))
            raise UsageError(f"{where}: unknown key '{prefix}{key}'", f"known keys: {known}")
        if norm in out:
            # TOML forbids duplicate keys, but `min-stable-rank` and `min_stable_rank` are two
            # spellings of one setting: silently keeping the last would hide a mistake.
            raise UsageError(
                f"{where}: '{prefix}{key}' is given twice (as '-' and '_' spellings)",
                "keep one of them",
            )
        out[norm] = value
    return out


def _mapping(value: Any, where: str, key: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise UsageError(f"{where}: '{key}' must be a table, got {type(value).__name__}")
    return value


def _role_key(key: str, where: str, prefix: str) -> str:
    if key not in ROLE_KEYS:
        raise UsageError(
            f"{where}: unknown role '{prefix}roles.{key}'",
            f"roles: {', '.join(sorted(ROLE_KEYS))}",
        )
    return key


def _override(value: Any, where: str, prefix: str) -> Override:
    table = _normalised(value, where, frozenset({*THRESHOLD_NAMES, "ignore"}), prefix)
    values = tuple(
        (k, _number(v, where, f"{prefix}{k}")) for k, v in table.items() if k != "ignore"
    )
    ignore = _rule_ids(table.get("ignore", []), where, f"{prefix}ignore")
    return Override(values, ignore)


def _number(value: Any, where: str, key: str) -> float:
    # bool is an int in Python; `min_stable_rank = true` is a mistake, not 1.0.
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    if not is_number or not math.isfinite(value) or value < 0:
        raise UsageError(f"{where}: '{key}' must be a non-negative number, got {value!r}")
    return float(value)


def _severity(value: Any, where: str) -> Severity:
    try:
        return Severity(value)
    except ValueError:
        raise UsageError(f"{where}: 'fail_on' must be error or warning, got {value!r}") from None


def _rule_ids(value: Any, where: str, key: str) -> frozenset[str]:
    if isinstance(value, str) or not isinstance(value, list | tuple):
        raise UsageError(f"{where}: '{key}' must be a list of rule ids, got {value!r}")
    if not all(isinstance(v, str) for v in value):
        raise UsageError(f"{where}: '{key}' must be a list of rule id strings, got {value!r}")
    unknown = [v for v in value if v not in RULES_BY_ID]
    if unknown:
        raise UsageError(
            f"{where}: '{key}' names unknown rule {unknown[0]!r}",
            f"rules: {', '.join(RULES_BY_ID)}",
        )
    return frozenset(value)
