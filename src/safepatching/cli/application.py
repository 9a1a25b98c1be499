"""The application: every command registered in one place, and the entry point that turns errors into one line."""

from __future__ import annotations

import logging
import os
import sys
from typing import Annotated

import typer

from safepatching.cli import experiments, patches, steps
from safepatching.cli.options import err
from safepatching.errors import SafePatchingError

app = typer.Typer(
    help="Post safety alignment of chat LLMs with SafePatching.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
STATE = {"debug": False}


class ShowOnce(logging.Filter):
    """Each distinct warning is shown once per command: repeated stages and the hub client's retries
    would otherwise print the same line again and again."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[tuple[str, str]] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        key = (record.name, record.getMessage())
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="show tracebacks")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="log each step")] = False,
) -> None:
    STATE["debug"] = debug
    handler = logging.StreamHandler()
    handler.addFilter(ShowOnce())
    level = logging.INFO if verbose or debug else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(message)s", handlers=[handler])
    logging.getLogger("huggingface_hub").handlers.clear()  # its records also reach ours: each shows once


# The commands in --help order, by group; "function:name" registers a function under another name.
COMMANDS = {
    experiments: "demo run bench continual sweep tune directions",
    steps: "evaluate:eval show_config:config derive score merge",
    patches: "export apply revert inspect",
}
OPTIONS = {"eval": {"context_settings": {"allow_extra_args": True}}}  # eval --compare A B C
for group, names in COMMANDS.items():
    for entry in names.split():
        function, _, name = entry.partition(":")
        app.command(name or None, **OPTIONS.get(name, {}))(getattr(group, function))


def main() -> None:
    """Console entry point: user errors become one line on stderr and a non-zero exit."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        app(standalone_mode=False)
    except SafePatchingError as exc:
        if STATE["debug"]:
            raise
        err.print(f"[bold red]error:[/bold red] {exc}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err.print("interrupted; finished stages are kept and a rerun resumes from them")
        sys.exit(130)
    except Exception as exc:  # usage errors and anything unexpected
        # Typer may bring its own copy of click, so usage errors are recognised by shape, not class.
        if callable(getattr(exc, "show", None)) and isinstance(getattr(exc, "exit_code", None), int):
            exc.show()
            sys.exit(exc.exit_code)
        if type(exc).__name__ == "Abort":
            sys.exit(130)
        if STATE["debug"]:
            raise
        err.print(
            f"[bold red]internal error:[/bold red] {type(exc).__name__}: {exc} (rerun with --debug for the "
            "traceback and please report it)",
            highlight=False,
            soft_wrap=True,
        )
        sys.exit(1)
