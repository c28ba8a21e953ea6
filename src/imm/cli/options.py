"""What several subcommands share, declared once: ``--device``, ``--threads``, ``--no-progress``, KEY=VALUE
overrides, the feature networks of the FID metrics, the ``network.*`` override splitter, argument types, and
the making of a subcommand's parser (description and examples) or of a command group (``imm eval``)."""

from __future__ import annotations

import argparse
import contextlib
import sys
import textwrap
import warnings

# where a process runs when --device is not given (imm.core.distributed.init)
DEFAULT_DEVICE = "cuda when available; under torchrun, each process its own GPU"


class HelpFormatter(argparse.HelpFormatter):
    """Wraps a text without line breaks (a description) to the terminal's width, never inside an option's
    name, and prints one with line breaks (the examples) as written."""

    def _fill_text(self, text, width, indent):
        if "\n" in text:
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return textwrap.fill(" ".join(text.split()), width, initial_indent=indent, subsequent_indent=indent,
                             break_on_hyphens=False)


def add_command(sub, name: str, *, help: str, description: str, examples: str) -> argparse.ArgumentParser:
    """A subcommand's parser: ``help`` in the list of commands, ``description`` and ``examples`` in its --help."""
    return sub.add_parser(name, help=help, description=description, epilog=examples, formatter_class=HelpFormatter)


def add_command_group(sub, name: str, *, help: str, description: str, examples: str):
    """A command made of subcommands (``imm eval ref``): alone it prints its help and exits with status 2.
    Returns the subparsers to add the subcommands to."""
    p = add_command(sub, name, help=help, description=description, examples=examples)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])
    return p.add_subparsers(dest=f"{name}_command", metavar=f"{name.upper()}_COMMAND")


def add_device(p, default: str = DEFAULT_DEVICE) -> None:
    p.add_argument("--device", default=None, help=f"cpu, cuda or cuda:N (default: {default})")


def add_threads(p) -> None:
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads (default: OMP_NUM_THREADS when set, else the cores other processes leave "
                        "free, looked at every few seconds)")


def add_fast_path(p) -> None:
    """--precision and --memory-format of a sampling command (imm.core.fastpath)."""
    from imm.core.fastpath import MEMORY_FORMATS, PRECISIONS

    p.add_argument("--precision", default="auto", choices=PRECISIONS,
                   help="what the network samples in; auto (default): bf16 where a probe of this CPU finds it "
                        "pays, else fp32 (on CUDA: the network's own setting)")
    p.add_argument("--memory-format", default="auto", choices=MEMORY_FORMATS,
                   help="the network's memory layout; auto (default): channels_last where the probe finds it pays")


def add_progress(p) -> None:
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_overrides(p, help: str) -> None:
    """KEY=VALUE arguments, collected into ``args.overrides`` wherever they stand on the line
    (:func:`imm.cli.parse_command_line`)."""
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=help)


def add_feature_networks(p) -> None:
    """The networks whose features the distances compare: Inception (FID) and DINOv2 (FD_DINOv2)."""
    p.add_argument("--inception", default=None, help="Inception weight file (default: cache or fid-helper wheel)")
    p.add_argument("--metrics", default="fid",
                   help="comma-separated: fid (Inception) and/or fd_dinov2 (DINOv2 ViT-L/14, as EDM2) (default: fid)")
    p.add_argument("--dinov2", default=None, metavar="HUB_ID|DIR",
                   help="DINOv2 model for fd_dinov2: a Hugging Face hub id or a local folder "
                        "(default: facebook/dinov2-large)")


def split_network_overrides(items: list[str]) -> tuple[list[str], dict]:
    """``(other overrides, {KEY: value})``: the ``network.KEY=VALUE`` items (canonical keys:
    :func:`imm.core.release.canonical_override`, so ``network.model_type=`` sets ``kind``) apply on top of the
    configuration a checkpoint carries, the others to the sampling configuration."""
    from imm.core.config import ConfigError, parse_value
    from imm.core.release import canonical_override

    rest, network = [], {}
    for item in items:
        translated = canonical_override(item.split("=", 1)[0].lstrip("+"), parse_value(item.split("=", 1)[-1]))
        if translated is None:  # a checked network.class_name: nothing to set
            continue
        key, value = translated
        if key.startswith("network.") and "=" in item:
            sub = key[len("network."):]
            if not sub or "." in sub:
                raise ConfigError(f"override {item!r}: network overrides are network.KEY=VALUE")
            network[sub] = value
        else:
            rest.append(item)
    return rest, network


def positive(text: str) -> int:
    """Argument type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def interval(text: str) -> list[float]:
    """Argument type: ``LO,HI``, two numbers."""
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected T_LO,T_HI such as 0.2,0.8; got {text!r}") from None
    return [lo, hi]


@contextlib.contextmanager
def warnings_to_stderr(command: str):
    """A context in which warnings print as one line ``imm COMMAND: warning: ...`` on stderr."""
    with warnings.catch_warnings():  # restores showwarning and the filters afterwards
        warnings.simplefilter("always", UserWarning)

        def show(message, category, filename, lineno, file=None, line=None):
            print(f"imm {command}: warning: {message}", file=sys.stderr)

        warnings.showwarning = show
        yield
