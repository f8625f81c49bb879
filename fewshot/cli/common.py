"""What the command lines share: the one-line error parser and the option groups that mean the same in
every command (backbone and ACDC, run folder, device and memory layout)."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from fewshot.acdc import SCOPES

ACDC_CHOICES = ("none", *SCOPES)
# --memory-format: how the model's 4-D weights and the images are stored (the same values either way).
MEMORY_FORMATS = {"channels_last": torch.channels_last, "contiguous": torch.contiguous_format}


class OneLineParser(argparse.ArgumentParser):
    """Bad flags are reported in one ``error: ...`` line with exit status 2, like every other error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def add_backbone_options(
    parser: argparse.ArgumentParser, backbones: Sequence[str] | None, default: str | None, atom_drop: float = 0.1
) -> argparse._ArgumentGroup:
    """``--backbone`` (one of ``backbones``; None: any name of the registry, checked when built), ``--stem``,
    ``--width``, and the ACDC options ``--acdc``, ``--atoms``, ``--group-size``, ``--atom-drop``."""
    group = parser.add_argument_group("backbone")
    if backbones is None:
        group.add_argument(
            "--backbone", required=default is None, default=default, help="a name of fewshot.list_backbones()"
        )
    else:
        group.add_argument("--backbone", choices=backbones, default=default)
    group.add_argument(
        "--stem",
        choices=("imagenet", "small"),
        default=None,
        help="ResNet stem: imagenet (7x7/2 + max-pool, Chen et al.) or small (3x3/1)",
    )
    group.add_argument(
        "--width", type=int, default=None, help="channels of the first stage (ResNets: 64 = Chen et al.; conv4: 64)"
    )
    group.add_argument("--acdc", choices=ACDC_CHOICES, default="none", help="ACDC sharing scope (none = dense)")
    group.add_argument("--atoms", type=int, default=8, help="m, filter atoms per layer")
    group.add_argument("--group-size", type=int, default=None, help="s, channels per group (g-* scopes)")
    group.add_argument("--atom-drop", type=float, default=atom_drop, help="ACDC atom-drop probability in training")
    return group


def add_run_options(parser: argparse.ArgumentParser, default_out: str) -> argparse._ArgumentGroup:
    """``--device``, ``--seed``, ``--out``, ``--resume`` and ``--no-progress``."""
    group = parser.add_argument_group("run")
    group.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:N")
    group.add_argument("--seed", type=int, default=0)
    group.add_argument("--out", default=None, help=f"run folder (default: {default_out})")
    group.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its last.pt, to the same result as an uninterrupted run",
    )
    group.add_argument("--no-progress", action="store_true", help="no progress bars")
    return group


def add_memory_format_option(group: argparse._ArgumentGroup) -> None:
    """``--memory-format {auto,channels_last,contiguous}``; ``resolved_memory_format`` makes ``auto`` concrete."""
    group.add_argument(
        "--memory-format",
        choices=("auto", *MEMORY_FORMATS),
        default="auto",
        help="how the model's weights and the images are laid out in memory (the same values either way): "
        "auto is channels_last on a CPU (training steps 1.1-1.3x faster there, benchmarks/memory_format.py) "
        "and contiguous elsewhere (not measured on a GPU)",
    )


def resolved_memory_format(choice: str, device: torch.device) -> str:
    """``--memory-format`` with ``auto`` made concrete: channels_last on a CPU, contiguous elsewhere."""
    if choice != "auto":
        return choice
    return "channels_last" if device.type == "cpu" else "contiguous"


def check_out_folder(out: Path, resume: bool, resume_point: Path, *others: Path) -> None:
    """A new run never writes into the folder of another; ``--resume`` needs that run's ``resume_point``."""
    check_out_is_folder(out)
    if resume and not resume_point.is_file():
        raise FileNotFoundError(f"--resume: {resume_point} does not exist; start without --resume")
    if not resume and any(p.exists() for p in (resume_point, *others)):
        raise ValueError(f"--out {out} already holds a run; pass --resume to continue it or choose another --out")


def check_number(
    args: argparse.Namespace, name: str, minimum: float = 0.0, strict: bool = True, below: float | None = None
) -> None:
    """``args.<name>`` (None: not given) must be a finite number > ``minimum`` (``strict``) or >= it, and below
    ``below`` if given; else one ValueError naming the flag. Step sizes, rates and factors: nan, inf and
    negative values would otherwise run to a meaningless result (or write NaN into result.json)."""
    value = getattr(args, name)
    if value is None:
        return
    flag = f"--{name.replace('_', '-')}"
    ok = math.isfinite(value) and (value > minimum if strict else value >= minimum)
    if ok and below is not None:
        ok = value < below
    if not ok:
        bound = f"{'>' if strict else '>='} {minimum:g}" + ("" if below is None else f" and < {below:g}")
        raise ValueError(f"{flag} must be a finite number {bound}, got {value}")


MAX_SEED = 2**63 - 1  # torch.manual_seed takes 64-bit seeds; larger ones would alias or overflow


def check_seeds(args: argparse.Namespace, names: Sequence[str]) -> None:
    """Each ``args.<name>`` must be a seed in 0 .. 2**63 - 1; else one ValueError naming the flag."""
    for name in names:
        value = getattr(args, name)
        if not 0 <= value <= MAX_SEED:
            raise ValueError(f"--{name.replace('_', '-')} must be an integer in 0 .. 2**63 - 1, got {value}")


def check_out_is_folder(out: Path) -> None:
    """``--out`` must be a folder or not exist yet (a file there would fail only after training)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder; give the folder of the run")


def check_at_least(args: argparse.Namespace, names: Sequence[str], minimum: int = 1) -> None:
    """Each ``args.<name>`` given (not None) must be >= ``minimum``; else one ValueError naming the flag."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < minimum:
            raise ValueError(f"--{name.replace('_', '-')} must be >= {minimum}, got {value}")
