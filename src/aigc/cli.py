"""The `aigc` command line: one sub-command per stage of the loop.

Thin by design: parse options, call the library, print. Results go to stdout, logs and progress to
stderr. A user error (`AigcError`) is printed as one line and the exit code is 1; nothing else is
caught, so a bug still shows its traceback.
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from rich.console import Console

from aigc import __version__
from aigc.errors import AigcError

out = Console()  # results
err = Console(stderr=True)  # logs, progress, errors

app = typer.Typer(
    name="aigc",
    help="AIGC Studio: train, evaluate, serve and tune generative models on your own data.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        out.print(f"aigc {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """AIGC Studio: collect -> preprocess -> train -> evaluate -> deploy -> generate -> rate -> tune."""


# Shared option types, so every sub-command spells them the same way.
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Config override key=value, e.g. --set train.lr=3e-4 (repeatable)."),
]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty output directory.")]


# ============================================================================ data
# (collect + preprocess) `aigc data prepare|list|show`

data_app = typer.Typer(help="Collect and preprocess data sets.", no_args_is_help=True)
app.add_typer(data_app, name="data")


# ============================================================================ train


# ============================================================================ generate


# ============================================================================ export


# ============================================================================ models


# ============================================================================ demo


# ============================================================================ entry point


def main(argv: list[str] | None = None) -> None:
    """Console-script entry: run the app, turning user errors into one line and exit code 1."""
    try:
        app(args=argv, prog_name="aigc")  # standalone: click prints usage errors itself (exit 2)
    except AigcError as e:
        err.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
