"""``python -m fewshot.analysis subspace|cam ...``: the paper's two explanations of ACDC (Sec. 3.2, Fig. 8).

Examples::

    python -m fewshot.analysis subspace                      # train a Conv4-32 with per-layer ACDC on glyphs
    python -m fewshot.analysis subspace --checkpoint runs/analysis/subspace_glyphs_w32_m9_s0/last.pt
    python -m fewshot.analysis cam --checkpoint runs/dense/last.pt --checkpoint runs/acdc/last.pt --images 6

Bad flags and values are reported in one ``error: ...`` line naming the flag (exit status 2).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from fewshot.cli.common import OneLineParser
from fewshot.config import cli_main

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The parser with the ``subspace`` and ``cam`` commands (each a :class:`OneLineParser`)."""
    from fewshot.analysis.cam_command import add_cam_options
    from fewshot.analysis.subspace_command import add_subspace_options

    parser = OneLineParser(prog="python -m fewshot.analysis", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="subspace|cam")
    add_subspace_options(
        commands.add_parser("subspace", help="cross-layer joint subspace of aligned atom coefficients (Sec. 3.2)")
    )
    add_cam_options(commands.add_parser("cam", help="class activation maps at every conv layer (Fig. 8)"))
    return parser


@cli_main
def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Parse ``argv`` and run the command; returns its report."""
    args = build_parser().parse_args(argv)
    if args.command == "subspace":
        from fewshot.analysis.subspace_command import run_subspace

        return run_subspace(args)
    from fewshot.analysis.cam_command import run_cam

    return run_cam(args)
