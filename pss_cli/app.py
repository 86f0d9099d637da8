"""The Typer app, and the ONE place where errors become ``Error: ...`` text and exit codes.

Importing this module must not import torch (``pss --help`` / ``--version`` stay fast): commands
import the library lazily, inside their bodies.
"""

from __future__ import annotations

import functools
import gc
import os
import select
import signal
import sys
from collections.abc import Callable, MutableMapping
from typing import Annotated, Any, NoReturn, TypeVar

import typer

from pss_cli import __version__
from pss_cli.commands.check import check_command
from pss_cli.commands.scan import scan_command
from pss_cli.commands.smooth import smooth_command
from pss_cli.commands.trend import trend_command
from pss_cli.errors import ExitCode, PssError

F = TypeVar("F", bound=Callable[..., Any])

app = typer.Typer(
    name="pss",
    help=(
        "Diagnose and repair singular weight spectra in neural-network checkpoints "
        "(Parametric Singularity Smoothing, arXiv 2602.01308)."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def report_error(message: str, hint: str | None) -> None:
    """Print a one-line error (and its hint) to stderr."""
    print(f"Error: {message}", file=sys.stderr)
    if hint:
        print(f"Hint: {hint}", file=sys.stderr)


def guarded(command: F) -> F:
    """Turn library errors into text and exit codes; never show a traceback for them."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            result = command(*args, **kwargs)
            sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's last flush
            return result
        except (typer.Exit, typer.Abort):
            raise  # deliberate exits carry their own code
        except BrokenPipeError as exc:
            if not _stdout_closed():
                _internal_error(exc)  # another pipe of pss's own: a real failure
            # `pss scan ... | head`: the reader has what it wanted. Not an error of pss: no
            # text (stderr may be the same closed pipe), and stdout is pointed at /dev/null so
            # that the interpreter's own flush at exit does not fail again.
            _silence_stdout()
            raise typer.Exit(int(ExitCode.BROKEN_PIPE)) from None
        except PssError as exc:
            _exit_if_terminated()
            report_error(exc.message, exc.hint)
            raise typer.Exit(int(exc.exit_code)) from None
        except KeyboardInterrupt:
            report_error("interrupted", None)
            raise typer.Exit(130) from None
        except MemoryError:
            _out_of_memory()
        except Exception as exc:
            if _is_allocation_failure(exc):
                _out_of_memory()
            _internal_error(exc)

    return wrapper  # type: ignore[return-value]


def _internal_error(exc: Exception) -> NoReturn:
    _exit_if_terminated()
    if os.environ.get("PSS_DEBUG"):
        raise exc
    detail = str(exc).splitlines()[0] if str(exc) else ""
    report_error(
        f"internal error: {type(exc).__name__}: {detail}",
        "this is a bug in pss; rerun with PSS_DEBUG=1 for a traceback and report it",
    )
    raise typer.Exit(int(ExitCode.INPUT)) from None


def _stdout_closed() -> bool:
    """Whether stdout is a pipe whose reader has gone (poll reports an error on it)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & select.POLLERR for _, events in poller.poll(0))
    except (OSError, ValueError, AttributeError):
        return True  # no descriptor to ask: trust the exception


def _silence_stdout() -> None:
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # no file descriptor behind sys.stdout (an embedding host)
        pass


def _version_callback(value: bool) -> None:
    if value:
        print(f"pss {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            callback=_version_callback,
            is_eager=True,
            help="Show the version and exit.",
        ),
    ] = False,
) -> None:
    """Diagnose and repair singular weight spectra in neural-network checkpoints."""


app.command("scan", no_args_is_help=True)(guarded(scan_command))
app.command("smooth", no_args_is_help=True)(guarded(smooth_command))
app.command("check", no_args_is_help=True)(guarded(check_command))
app.command("trend", no_args_is_help=True)(guarded(trend_command))


def _is_allocation_failure(exc: Exception) -> bool:
    # torch's CPU allocator raises RuntimeError, not MemoryError, when malloc fails ("[enforce
    # fail at alloc_cpu.cpp] ... DefaultCPUAllocator: can't allocate memory"), e.g. under
    # `ulimit -v`: the same out-of-memory message, not "internal error: a bug in pss".
    return isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)


def _out_of_memory() -> NoReturn:
    report_error(
        "out of memory", "use --include to scan fewer tensors, or a machine with more memory"
    )
    raise typer.Exit(int(ExitCode.INPUT)) from None


_TERMINATED: list[int] = []  # SIGTERM received (set by the handler main() installs)


def _terminated(signum: int, _frame: object) -> None:
    # SIGTERM (a cancelled CI job, docker stop, kill) unwinds like Ctrl-C, so the writers'
    # cleanup runs and no staging folder is left behind; only SIGKILL cannot be caught.
    _TERMINATED.append(signum)
    raise KeyboardInterrupt


def _exit_if_terminated() -> None:
    # A KeyboardInterrupt raised inside torch or safetensors can come out as another error
    # (e.g. a RuntimeError turned into "cannot read tensor"): after SIGTERM, say what happened.
    if _TERMINATED:
        report_error("interrupted", None)
        raise typer.Exit(130) from None


# MKL's conditional numerical reproducibility: with it, MKL's GEMMs give the same bits whatever
# the thread count (an Intel Xeon gave other last bits under 1 and 2 threads without it). MKL
# reads it once, when torch loads MKL, so it must be in the environment before torch is imported:
# `pss` sets it here, before any command imports torch; a library user sets it themselves
# (docs/scan.md "Reproducibility"). An existing value (the user's own choice) is kept.
MKL_CBWR_DEFAULT = "AUTO,STRICT"


def reproducible_blas(environ: MutableMapping[str, str]) -> None:
    """Ask MKL for thread-count-invariant results, unless the user chose otherwise."""
    environ.setdefault("MKL_CBWR", MKL_CBWR_DEFAULT)


def runs_a_command(argv: list[str]) -> bool:
    """True when the command line runs one of the app's commands (each imports torch), not
    just --help or --version."""
    commands = {info.name for info in app.registered_commands}
    return bool(argv) and argv[0] in commands and "--help" not in argv


def settle_imports() -> None:
    """Import torch, then move every object alive so far out of the garbage collector's sight.

    Why (measured on an AMD EPYC Zen 4, Python 3.11, torch 2.13.0): importing torch leaves
    ~170,000 objects that every full collection walks: one came during a Llama-block scan (95 ms),
    and the collections of interpreter shutdown took ~0.45 s of a `python -c "import torch"`
    that lasted 1.6 s (0.12 s after gc.freeze()). Those module objects live until exit anyway.
    Only the command-line entry point does this: the library never touches its host
    process's collector.
    """
    try:
        import torch  # noqa: F401  (the import every command makes first)
    except ImportError:
        return  # a broken install: the command's own import reports it, as before
    gc.freeze()


def main() -> None:
    reproducible_blas(os.environ)  # before torch is imported (see above)
    signal.signal(signal.SIGTERM, _terminated)
    if runs_a_command(sys.argv[1:]):
        try:
            settle_imports()
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM during the import: as inside a command
            report_error("interrupted", None)
            sys.exit(130)
    try:
        app()
    finally:
        # The objects of the run, too, need no collection at shutdown: the process is ending.
        gc.freeze()
