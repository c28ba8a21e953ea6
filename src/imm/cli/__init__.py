"""The ``imm`` command: one entry point, one subcommand per job (``imm --help`` lists them).

Each module here declares its subcommands' parsers and thin command functions over the library:
:mod:`~imm.cli.generate`, :mod:`~imm.cli.train` (train, demo), :mod:`~imm.cli.checkpoint` (convert, info),
:mod:`~imm.cli.eval` (eval ref, eval fid), :mod:`~imm.cli.prepare` (prepare images, latents, stats),
:mod:`~imm.cli.ema` (ema reconstruct), :mod:`~imm.cli.share` (export diffusers, push) and
:mod:`~imm.cli.explore` (explore), :mod:`~imm.cli.launch` (launch slurm);
:mod:`~imm.cli.options` holds the options they share.
"""

from __future__ import annotations

import argparse
import sys

from imm import __version__
from imm.cli import checkpoint, ema, explore, generate, launch, prepare, share, train
from imm.cli import eval as evaluation  # the module imm.cli.eval, not Python's eval
from imm.core.errors import ImmError, printable

# in the order `imm --help` lists their subcommands
COMMAND_MODULES = (generate, train, launch, checkpoint, evaluation, prepare, ema, share, explore)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="imm", description="Inductive Moment Matching: few-step generative models (training, sampling, conversion).")
    parser.add_argument("--version", action="version", version=f"imm {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in COMMAND_MODULES:
        module.add_parsers(sub)
    return parser


def parse_command_line(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """``parser.parse_args``, except that KEY=VALUE overrides may come anywhere, also after options
    (``imm generate --checkpoint C eval.seed=1 --out D eval.batch_size=2``)."""
    args, extra = parser.parse_known_args(argv)
    late = [a for a in extra if "=" in a and not a.startswith("-")]
    if late and hasattr(args, "overrides"):
        args.overrides = [*args.overrides, *late]
        extra = [a for a in extra if a not in late]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse_command_line(parser, argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        if hasattr(args, "threads"):
            from imm.core import threads

            threads.configure(args.threads)
        return args.func(args)
    except (ImmError, OSError) as e:  # expected: bad input, missing files or packages, the file system; a bug
        # (any other exception) keeps its traceback
        from imm.core import distributed

        distributed.shutdown()
        print(f"imm {args.command}: error: {printable(e)}", file=sys.stderr)  # one line, whatever a file held
        return 2
    except KeyboardInterrupt as e:
        print(f"imm {args.command}: interrupted{': ' + str(e) if str(e) else ''}", file=sys.stderr)
        return 130

