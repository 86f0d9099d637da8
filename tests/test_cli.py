"""The CLI through typer's CliRunner: output formats, streams, exit codes, error text."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pss_cli import __version__
from pss_cli.app import app, runs_a_command
from pss_cli.errors import ExitCode
from tests.safetensors_factory import write_tensors, write_truncated

SAMPLES = Path(__file__).resolve().parent.parent / "sample_checkpoints"
DIVERGED = SAMPLES / "diverged" / "model.safetensors"
REQUIRED_LAYER_KEYS = {
    "name",
    "file",
    "shape",
    "dtype",
    "role",
    "sigma_max",
    "frobenius_norm",
    "stable_rank",
    "top_singular_values",
    "topk_energy_share",
    "nonfinite_count",
    "flags",
}


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def test_version(runner: CliRunner) -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.stdout.strip() == f"pss {__version__}"


def _python(code: str) -> subprocess.CompletedProcess[str]:
    """Run `code` in a fresh interpreter (imports start from nothing); it must exit 0."""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done


@pytest.mark.parametrize("entry", ["app", "main"])
@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["scan", "--help"]])
def test_help_and_version_do_not_import_torch(argv: list[str], entry: str) -> None:
    call = f"app({argv!r})" if entry == "app" else f"sys.argv = ['pss', *{argv!r}]; main()"
    code = (
        "import sys; from pss_cli.app import app, main\n"
        f"try:\n    {call}\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
        "assert 'scipy' not in sys.modules, 'scipy imported'\n"
    )
    _python(code)


@pytest.mark.parametrize(
    ("argv", "runs"),
    [
        (["scan", "x.safetensors"], True),
        (["check", "a", "--max-flagged", "0"], True),
        (["smooth", "a", "-o", "b"], True),
        (["trend", "run/"], True),
        (["scan", "--help"], False),
        (["--help"], False),
        (["--version"], False),
        ([], False),
    ],
)
def test_only_a_command_settles_its_imports(argv: list[str], runs: bool) -> None:
    assert runs_a_command(argv) is runs


def test_the_command_line_keeps_its_imports_from_the_collector() -> None:
    # `pss scan` imports torch, then freezes the collector's view of those objects (app.py:
    # settle_imports); the scan's output is unchanged by it.
    code = (
        "import gc, sys; from pss_cli.app import main\n"
        f"sys.argv = ['pss', 'scan', {str(DIVERGED)!r}, '-f', 'json', '-q']\n"
        "try:\n    main()\nexcept SystemExit as exc:\n    assert not exc.code, exc.code\n"
        "assert 'torch' in sys.modules and gc.get_freeze_count() > 10000, gc.get_freeze_count()\n"
    )
    done = _python(code)
    assert json.loads(done.stdout)["summary"]["flagged"] == 3


def test_table_on_the_diverged_sample(runner: CliRunner) -> None:
    result = runner.invoke(app, ["scan", str(DIVERGED), "--limit", "5"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert any("transformer.h.3.mlp.c_fc.weight" in line for line in lines)
    assert "(13 more layers not shown" in result.stdout
    assert "18 matrices, 3 flagged (stable rank < 5.0)" in result.stdout
    # Worst first: the first data row is the lowest stable rank.
    body = [line for line in lines if "transformer." in line]
    assert "h.3.mlp.c_fc" in body[0]


def test_json_is_clean_and_complete(runner: CliRunner) -> None:
    result = runner.invoke(app, ["scan", str(DIVERGED), "--format", "json"])
    assert result.exit_code == 0
    report = json.loads(result.stdout)  # stdout holds the JSON and nothing else
    for key in (
        "schema_version",
        "pss_version",
        "checkpoint",
        "device",
        "seed",
        "method",
        "layers",
        "skipped",
        "summary",
    ):
        assert key in report
    assert report["schema_version"] == 1 and report["pss_version"] == __version__
    assert all(set(layer) >= REQUIRED_LAYER_KEYS for layer in report["layers"])
    assert all({"name", "reason"} <= set(s) for s in report["skipped"])
    assert report["summary"]["flagged"] == 3


def test_output_file_written_only_on_success(runner: CliRunner, tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    result = runner.invoke(app, ["scan", str(DIVERGED), "-f", "json", "-o", str(out)])
    assert result.exit_code == 0
    assert json.loads(out.read_text())["summary"]["matrices"] == 18
    failed = tmp_path / "failed.json"
    result = runner.invoke(app, ["scan", str(tmp_path / "missing"), "-o", str(failed)])
    assert result.exit_code == ExitCode.INPUT
    assert not failed.exists()


def test_missing_path_is_one_line_error_exit_3(runner: CliRunner, tmp_path: Path) -> None:
    missing = tmp_path / "nope.safetensors"
    result = runner.invoke(app, ["scan", str(missing)])
    assert result.exit_code == 3
    assert result.stdout == ""
    assert result.stderr.splitlines()[0] == f"Error: path '{missing}' does not exist"
    assert result.stderr.splitlines()[1].startswith("Hint: ")
    assert "Traceback" not in result.stderr


def test_truncated_file_names_the_file(runner: CliRunner, tmp_path: Path) -> None:
    path = write_truncated(tmp_path / "cut.safetensors")
    result = runner.invoke(app, ["scan", str(path)])
    assert result.exit_code == 3
    assert result.stderr.startswith(f"Error: '{path}': file is truncated")


def test_directory_without_checkpoint(runner: CliRunner, tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hi")
    result = runner.invoke(app, ["scan", str(tmp_path)])
    assert result.exit_code == 3
    assert "holds no .safetensors files" in result.stderr


@pytest.mark.parametrize(
    "argv",
    [
        ["scan", "--format", "xml", str(DIVERGED)],
        ["scan", "--top-k", "0", str(DIVERGED)],
        ["scan", "--device", "tpu", str(DIVERGED)],
        ["scan", "--no-such-flag", str(DIVERGED)],
    ],
)
def test_usage_errors_exit_2(runner: CliRunner, argv: list[str]) -> None:
    result = runner.invoke(app, argv)
    assert result.exit_code == ExitCode.USAGE, result.output
    assert "Traceback" not in result.output


def test_cuda_requested_without_cuda_is_a_usage_error(runner: CliRunner) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA present")
    result = runner.invoke(app, ["scan", "--device", "cuda", str(DIVERGED)])
    assert result.exit_code == 2
    assert "CUDA is not available" in result.stderr


def test_nan_weights_scan_and_report_null(runner: CliRunner, tmp_path: Path) -> None:
    import torch

    w = torch.randn(8, 8)
    w[0, 0] = float("nan")
    path = write_tensors(tmp_path / "m.safetensors", {"w": w, "v": torch.randn(8, 8)})
    result = runner.invoke(app, ["scan", str(path), "-f", "json"])
    assert result.exit_code == 0
    report = json.loads(result.stdout)
    bad = next(x for x in report["layers"] if x["name"] == "w")
    assert bad["stable_rank"] is None and bad["nonfinite_count"] == 1
    assert "nonfinite" in bad["flags"]


def test_python_dash_m(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pss_cli", "scan", str(DIVERGED), "-f", "json", "-q"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["summary"]["flagged"] == 3
    assert done.stderr == ""  # no progress bar when stderr is not a terminal


def test_output_never_overwrites_the_checkpoint(runner: CliRunner, tmp_path: Path) -> None:
    import shutil

    victim = tmp_path / "victim.safetensors"
    shutil.copy(DIVERGED, victim)
    before = victim.read_bytes()
    result = runner.invoke(app, ["scan", str(victim), "-o", str(victim)])
    assert result.exit_code == 2 and "would overwrite part of the checkpoint" in result.stderr
    folder = SAMPLES / "sharded"
    result = runner.invoke(app, ["scan", str(folder), "-o", str(folder / "r.json")])
    assert result.exit_code == 2 and not (folder / "r.json").exists()
    assert victim.read_bytes() == before
    result = runner.invoke(app, ["scan", str(victim), "-o", str(tmp_path)])
    assert result.exit_code == 2 and "it is a folder" in result.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["victim.safetensors"]  # no temp file left


def test_include_matching_nothing_is_a_usage_error(runner: CliRunner) -> None:
    result = runner.invoke(app, ["scan", str(DIVERGED), "--include", "nomatch*"])
    assert result.exit_code == 2
    assert "--include 'nomatch*' matches no tensor" in result.stderr


def test_markup_in_names_is_shown_verbatim(runner: CliRunner, tmp_path: Path) -> None:
    import torch

    names = ["h.0.mlp.[/note].weight", "h.1.[bold]fc[/bold].weight"]
    path = write_tensors(tmp_path / "[exp1].safetensors", {n: torch.randn(8, 8) for n in names})
    result = runner.invoke(app, ["scan", str(path)], terminal_width=200)
    assert result.exit_code == 0, result.output
    for name in names:
        assert name in result.stdout
    assert "[exp1]" in result.stdout


def test_large_stable_ranks_keep_their_digits() -> None:
    from pss_cli.report.table import _fmt

    assert _fmt(1023.7, 2) == "1023.70"
    assert _fmt(4096.0, 2) == "4096.00"
    assert _fmt(2.5e-5, 3) == "2.50e-05"


def test_summary_counts_each_kind_of_flag(runner: CliRunner, tmp_path: Path) -> None:
    import torch

    nan = torch.randn(6, 5)
    nan[0, 0] = float("nan")
    tensors = {"zero": torch.zeros(6, 5), "nan": nan, "ok": torch.randn(6, 5)}
    path = write_tensors(tmp_path / "m.safetensors", tensors)
    result = runner.invoke(app, ["scan", str(path)], terminal_width=200)
    assert "3 matrices, 2 flagged (1 with NaN/Inf, 1 all-zero), 0 tensors skipped" in result.stdout


def test_a_newline_in_a_tensor_name_does_not_split_the_table_row(tmp_path: Path) -> None:
    import torch

    path = tmp_path / "m.safetensors"
    name = "evil\nname\x1b[31m"
    write_tensors(path, {name: torch.randn(64, 48, generator=torch.Generator().manual_seed(0))})
    result = CliRunner().invoke(app, ["scan", str(path), "-q"], terminal_width=200)
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    shown = [line for line in lines if "evil" in line]  # the table row and the summary line
    assert len(shown) == 2 and all("evil\\nname\\x1b[31m" in line for line in shown)
    assert not any(line.lstrip("│ ").startswith("name") for line in lines)  # nothing split
    assert "\x1b" not in result.stdout
    data = json.loads(CliRunner().invoke(app, ["scan", str(path), "-f", "json", "-q"]).stdout)
    assert data["layers"][0]["name"] == name  # JSON keeps the exact name


def test_an_interrupt_while_torch_loads_is_reported_like_one_in_a_command(
    monkeypatch, capsys
) -> None:
    import pss_cli.app as app_module

    def interrupted() -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(app_module, "settle_imports", interrupted)
    monkeypatch.setattr(sys, "argv", ["pss", "scan", str(DIVERGED)])
    with pytest.raises(SystemExit) as exit_info:
        app_module.main()
    assert exit_info.value.code == 130
    assert capsys.readouterr().err == "Error: interrupted\n"


@pytest.mark.parametrize("argv", [["scan", "-f", "json"], ["scan"], ["check"]])
def test_a_reader_that_goes_away_is_not_reported_as_a_bug(argv: list[str]) -> None:
    # `pss scan ... | head`: the pipe closes before pss writes. This once printed "internal
    # error: BrokenPipeError ... this is a bug in pss" and exited 3.
    sample = Path(__file__).resolve().parent.parent / "sample_checkpoints" / "diverged"
    command = [sys.executable, "-m", "pss_cli", argv[0], str(sample / "model.safetensors")]
    process = subprocess.Popen(
        [*command, *argv[1:]], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert process.stdout is not None and process.stderr is not None
    process.stdout.close()
    errors = process.stderr.read()
    assert process.wait() == ExitCode.BROKEN_PIPE == 141
    assert errors == ""


@pytest.mark.parametrize("command", ["scan", "smooth", "trend"])
@pytest.mark.parametrize("value", ["nan", "-1", "0", "inf"])
def test_a_meaningless_min_stable_rank_is_a_usage_error(
    command: str, value: str, tmp_path: Path
) -> None:
    # nan once passed: "0 flagged (stable rank < nan)", null in the JSON, nothing smoothed.
    sample = Path(__file__).resolve().parent.parent / "sample_checkpoints" / "diverged"
    argv = [command, str(sample / "model.safetensors"), "--min-stable-rank", value]
    if command == "smooth":
        argv += ["--out", str(tmp_path / "out.safetensors")]
    result = CliRunner().invoke(app, argv)
    assert result.exit_code == ExitCode.USAGE, result.output
    assert "--min-stable-rank must be a positive number" in result.stderr
    assert not (tmp_path / "out.safetensors").exists()


def test_a_broken_pipe_that_is_not_stdout_is_still_an_error() -> None:
    # Only a closed stdout means "the reader went away"; any other EPIPE is a failure.
    code = (
        "import typer\n"
        "from pss_cli.app import guarded\n"
        "@guarded\n"
        "def command() -> None:\n"
        "    raise BrokenPipeError(32, 'Broken pipe (a socket of its own)')\n"
        "app = typer.Typer()\n"
        "app.command()(command)\n"
        "app([])\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == ExitCode.INPUT, done.stderr
    assert "internal error: BrokenPipeError" in done.stderr


def test_summary_and_notes_are_one_line_each_however_long(
    runner: CliRunner, tmp_path: Path
) -> None:
    # `pss scan ... | tail -1` reads the summary (docs/smooth.md): a long tensor name must not
    # break it onto two lines when stdout is a pipe (it was wrapped at 160 columns).
    import torch

    name = "model.transformer.encoder.layers.0." + "very_long_module_name." * 8 + "weight"
    spike = torch.ones(64, 1) @ torch.ones(1, 64)
    path = write_tensors(tmp_path / "m.safetensors", {name: torch.eye(64) + 10 * spike})
    lines = runner.invoke(app, ["scan", str(path)]).stdout.rstrip("\n").splitlines()
    assert lines[-1].startswith("1 matrix, 1 flagged") and lines[-1].endswith(" s")
    assert name in lines[-1]


def test_a_table_in_a_pipe_is_as_wide_as_it_needs(
    runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Files, pipes and CI logs got the table at a fixed 160 columns: long names folded, and the
    # trend table's right-hand columns (sigma_max trend) were cut. COLUMNS still rules.
    import torch

    monkeypatch.delenv("COLUMNS", raising=False)
    name = "model.transformer.encoder.layers.0." + "very_long_module_name." * 8 + "weight"
    weight = torch.randn(64, 64, generator=torch.Generator().manual_seed(0))
    path = write_tensors(tmp_path / "m.safetensors", {name: weight})
    table = runner.invoke(app, ["scan", str(path)]).stdout
    row = next(line for line in table.splitlines() if name in line)  # one line, whole name
    assert len(row) > 200 and row.rstrip().endswith("│")
    monkeypatch.setenv("COLUMNS", "120")
    narrow = runner.invoke(app, ["scan", str(path)]).stdout
    rows = [line for line in narrow.splitlines() if "│" in line]
    assert not any(name in line for line in rows)  # folded at 120
    assert max(len(line) for line in rows) <= 120


def test_output_onto_a_device_fifo_or_symlink_keeps_them(runner: CliRunner, tmp_path: Path) -> None:
    # A rename onto -o replaced a device node with a regular file (as root, `-o /dev/null`
    # replaced the system's /dev/null), and a symlink with a file beside its target.
    import os
    import stat
    import threading

    argv = ["scan", str(DIVERGED), "-f", "json", "-o"]
    if os.geteuid() == 0:  # a private copy of /dev/null: never the machine's own
        null = tmp_path / "null"
        os.mknod(null, stat.S_IFCHR | 0o666, os.makedev(1, 3))
        assert runner.invoke(app, [*argv, str(null)]).exit_code == 0
        assert stat.S_ISCHR(os.lstat(null).st_mode)
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()))
    reader.start()
    assert runner.invoke(app, [*argv, str(fifo)]).exit_code == 0
    reader.join(timeout=30)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert json.loads(received[0])["summary"]["matrices"] == 18
    target = tmp_path / "reports" / "latest.json"
    target.parent.mkdir()
    target.write_text("old")
    link = tmp_path / "latest.json"
    link.symlink_to(target)
    assert runner.invoke(app, [*argv, str(link)]).exit_code == 0
    assert link.is_symlink() and json.loads(target.read_text())["summary"]["matrices"] == 18


def test_a_failed_allocation_is_out_of_memory_not_a_bug(
    runner: CliRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    # torch's CPU allocator raises RuntimeError (under `ulimit -v`, say), not MemoryError.
    import pss_cli.pipeline.solve as solve

    def fail(*_args: object) -> None:
        raise RuntimeError(
            "[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate "
            "memory: you tried to allocate 33554432 bytes. Error code 12"
        )

    monkeypatch.setattr(solve, "_solve", fail)
    result = runner.invoke(app, ["scan", str(DIVERGED)])
    assert result.exit_code == ExitCode.INPUT
    assert result.stderr.startswith("Error: out of memory") and "bug" not in result.stderr
    monkeypatch.setattr(solve, "_solve", lambda *_: (_ for _ in ()).throw(RuntimeError("odd")))
    result = runner.invoke(app, ["scan", str(DIVERGED)])
    assert "internal error: RuntimeError: odd" in result.stderr


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_full_stdout_is_a_failed_run_not_a_bug() -> None:
    with open("/dev/full", "w") as full:
        done = subprocess.run(
            [sys.executable, "-m", "pss_cli", "scan", str(DIVERGED), "-f", "json"],
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
        )
    assert done.returncode == ExitCode.INPUT
    assert done.stderr.startswith("Error: cannot write the report to standard output: No space")
    assert "bug" not in done.stderr and "Traceback" not in done.stderr


def test_an_output_folder_removed_during_the_run_fails_the_run(tmp_path: Path) -> None:
    # Checked before the work (exit 2 then); gone by the time the report is written, the run
    # itself failed: exit 3.
    from pss_cli.report.files import OutputError, write_text_atomically

    gone = tmp_path / "gone"
    with pytest.raises(OutputError, match="does not exist") as failure:
        write_text_atomically(gone / "report.json", "{}")
    assert failure.value.exit_code == ExitCode.INPUT
