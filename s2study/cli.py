"""The ``s2study`` command line.

Each subcommand lives beside the code it drives: a module listed in :data:`COMMAND_MODULES`
exposes ``register_cli(subparsers)``, which adds its parser and sets ``func(args) -> int``.
User errors (:class:`~s2study.errors.S2StudyError`) print one line and exit with code 2;
``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import re
import sys

from s2study import __version__
from s2study.errors import S2StudyError

#: modules providing subcommands, in the order ``--help`` lists them
COMMAND_MODULES = (
    "s2study.study.commands",  # run, report
    "s2study.train",  # train
    "s2study.evaluate",  # eval, match, extract
    "s2study.fetch",  # fetch, data download
    "s2study.cluster",  # cluster check
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="s2study",
        description="S2-Net cross-modality local features: train, evaluate and run studies.",
    )
    parser.add_argument("--version", action="version", version=f"s2study {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:
                raise
            continue
        module.register_cli(sub)
    return parser


def one_line(exc: BaseException) -> str:
    """The user-facing line of an error; an error re-raised by a DataLoader worker carries the
    worker's traceback in its message, whose last line is the original message."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else type(exc).__name__
    return re.sub(r"^[\w.]*\.\w+: ", "", lines[-1].strip())


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except S2StudyError as exc:
        if args.debug:
            raise
        print(f"s2study: error: {one_line(exc)}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("s2study: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
