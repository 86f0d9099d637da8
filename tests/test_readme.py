"""The README and docs/ stay in sync with the CLI: quickstart, options, exit codes, CI's test
command, links; the README stays a front door."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pss_cli.app import app
from pss_cli.errors import ExitCode

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def _section(title: str) -> str:
    match = re.search(rf"^##+ {re.escape(title)}\n(.*?)(?=^## )", README, re.S | re.M)
    assert match, f"README has no section {title!r}"
    return match.group(1)


def test_quickstart_has_exactly_two_commands() -> None:
    blocks = re.findall(r"```bash\n(.*?)```", _section("Quickstart"), re.S)
    assert len(blocks) == 2
    scan, tests = (block.strip() for block in blocks)
    assert "pss scan sample_checkpoints/" in scan
    assert tests.endswith("python -m pytest -q")
    # Each installs torch 2.13.0 first so pip never pulls a CUDA build on a CPU machine.
    for command in (scan, tests):
        assert command.index("torch==2.13.0") < command.index(
            "pip install -e" if "-e" in command else "pip install ."
        )
    sample = scan.split("pss scan ", 1)[1].split()[0]
    assert (ROOT / sample).exists()


def test_ci_runs_the_readme_test_command() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    assert ci.rstrip().splitlines()[-1] == "python -m pytest -q"
    assert "pip install --quiet torch==2.13.0" in ci


def test_exit_code_table_matches_the_enum() -> None:
    rows = re.findall(r"^\| (\d+) \| ", _section("Exit codes"), re.M)
    assert sorted(int(code) for code in rows) == sorted(int(code) for code in ExitCode)


@pytest.mark.parametrize("command", ["scan", "smooth", "check", "trend"])
def test_every_option_is_documented(command: str) -> None:
    result = CliRunner().invoke(app, [command, "--help"], terminal_width=200)
    assert result.exit_code == 0
    documented = (ROOT / "docs" / f"{command}.md").read_text()
    options = set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]+)", result.stdout)) - {"--help"}
    assert options, "no options parsed from --help"
    missing = sorted(o for o in options if not re.search(rf"`[^`]*{o}(?![\w-])", documented))
    assert not missing, f"options missing from docs/{command}.md's table: {missing}"


def test_readme_example_output_matches_a_real_scan() -> None:
    result = CliRunner().invoke(
        app,
        ["scan", "sample_checkpoints/diverged/model.safetensors", "--limit", "4"],
        terminal_width=200,
    )
    assert result.exit_code == 0
    example = _section("Reading the output")
    for line in result.stdout.splitlines():
        if "│ transformer." in line:
            assert line.strip() in example, line
    summary = result.stdout.strip().splitlines()[-1]
    assert summary.split("; block-krylov")[0] in example


def test_readme_is_a_front_door() -> None:
    """The reference lives in docs/; the README stays short enough to read (issue #16)."""
    assert len(README.splitlines()) <= 300


@pytest.mark.parametrize(
    "page", ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]
)
def test_relative_links_resolve(page: str) -> None:
    """Every relative link in the README and docs/ points to a file that exists."""
    path = ROOT / page
    text = path.read_text()
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    broken = [
        t
        for t in targets
        if not re.match(r"[a-z]+:", t)
        and not t.startswith("#")
        and not (path.parent / t.split("#", 1)[0]).exists()
    ]
    assert not broken, f"{page}: broken links {broken}"


def test_library_example_runs_as_written(capsys: pytest.CaptureFixture[str]) -> None:
    """The README's "As a library" snippet runs from the repository root and finds the worst
    matrix of the diverged sample (the same one the table above shows first)."""
    blocks = re.findall(r"```python\n(.*?)```", _section("As a library"), re.S)
    assert len(blocks) == 1
    import os

    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        exec(compile(blocks[0], "README.md", "exec"), {})
    finally:
        os.chdir(cwd)
    assert capsys.readouterr().out.startswith("transformer.h.3.mlp.c_fc.weight 1.27")
