"""Each command's --format goes through its own registry: a format a command does not render is
a UsageError naming the ones it does, never a silent table."""

from __future__ import annotations

from enum import StrEnum

import pytest

from pss_cli.config import OutputFormat
from pss_cli.errors import UsageError
from pss_cli.report import check_formats, render, smooth, trend_render
from pss_cli.report.formats import renderer_for


class _Other(StrEnum):
    YAML = "yaml"


@pytest.mark.parametrize(
    ("command", "registry"),
    [
        ("scan", render._RENDERERS),
        ("smooth", smooth._RENDERERS),
        ("trend", trend_render._RENDERERS),
        ("check", check_formats._RENDERERS),
    ],
)
def test_an_unregistered_format_is_an_error(command: str, registry: dict) -> None:  # type: ignore[type-arg]
    with pytest.raises(UsageError) as raised:
        renderer_for(command, registry, _Other.YAML)
    assert f"pss {command}" in raised.value.message and "yaml" in raised.value.message
    for name in registry:
        assert str(name) in (raised.value.hint or "")


@pytest.mark.parametrize(
    "registry", [render._RENDERERS, smooth._RENDERERS, trend_render._RENDERERS]
)
def test_scan_smooth_and_trend_render_every_output_format(registry: dict) -> None:  # type: ignore[type-arg]
    assert set(registry) == set(OutputFormat)
    assert len({id(f) for f in registry.values()}) == len(registry)  # no format aliases another


def test_a_command_without_the_format_refuses_it(monkeypatch: pytest.MonkeyPatch) -> None:
    # A format only scan renders (a new one, say) must not print smooth's table.
    monkeypatch.delitem(smooth._RENDERERS, OutputFormat.JSON)
    with pytest.raises(UsageError, match="pss smooth"):
        smooth.render_smooth(object(), OutputFormat.JSON)  # type: ignore[arg-type]
