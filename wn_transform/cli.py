"""The ``wn-transform`` command line.  Subcommands arrive with the deployment work; for now
``--help`` and ``--version``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import __version__

EPILOG = """\
example:
  wn-transform --version
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wn-transform",
        description="Weight normalization (Salimans & Kingma, 2016) for PyTorch checkpoints.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"wn-transform {__version__}")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    parser.parse_args(argv)
    parser.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
