"""The rules of the ACDC options, in one place: which sharing scopes exist, which take a group size, the
number of atoms and the atom-drop rate.

``check_acdc_options`` is what ``convert``, ``create_backbone`` and the command lines call; its messages
name the options the way the caller's user writes them (``group_size=`` in Python, ``--group-size`` on a
command line).
"""

from __future__ import annotations

from typing import Literal

__all__ = ["DENSE", "SCOPES", "GROUPED_SCOPES", "check_acdc_options", "check_atom_drop", "check_positive_int"]

DENSE = "none"
SCOPES: tuple[str, ...] = ("net", "block", "layer", "g-net", "g-block", "g-layer")
GROUPED_SCOPES: tuple[str, ...] = ("g-net", "g-block", "g-layer")


def check_positive_int(value: object, what: str) -> int:
    """``value`` if it is an integer >= 1 (not a bool), else a ValueError naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be an integer >= 1, got {value!r}")
    return value


def check_atom_drop(p: object, what: str = "atom_drop") -> float:
    """``p`` as a float if it is a valid atom-drop rate (``0 <= p < 1``), else a ValueError naming ``what``."""
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not (0.0 <= float(p) < 1.0):
        raise ValueError(f"{what} must be a number in [0, 1), got {p!r}")
    return float(p)


def check_acdc_options(
    scope: object,
    atoms: object = 8,
    group_size: object = None,
    atom_drop: object = 0.1,
    decompose_stem: bool = False,
    *,
    scope_name: str = "scope",
    style: Literal["python", "cli"] = "python",
) -> str | None:
    """Check the ACDC options together; return the scope to convert with, or None for the dense network
    (``scope`` None or ``"none"``).

    Refused: an unknown scope; ``atoms`` not an integer >= 1 or ``atom_drop`` outside [0, 1) (for the dense
    network too: a bad value is never silently ignored); a grouped scope without ``group_size``, a ``group_size`` not an
    integer >= 1, or one given to a scope without groups; ``decompose_stem`` for the dense network. Messages name
    the options as keywords (``style="python"``, the scope as ``scope_name``) or as flags (``style="cli"``:
    ``--acdc``, ``--group-size``, ...).
    """

    def name(key: str) -> str:
        key = scope_name if key == "scope" else key
        return f"--{key.replace('_', '-')}" if style == "cli" else key

    def given(key: str, value: object) -> str:
        return f"{name(key)} {value}" if style == "cli" else f"{name(key)}={value!r}"

    if scope is not None and scope != DENSE and scope not in SCOPES:
        raise ValueError(f"unknown {name('scope')} {scope!r}; valid: {DENSE}, {', '.join(SCOPES)}")
    check_positive_int(atoms, name("atoms"))
    check_atom_drop(atom_drop, name("atom_drop"))
    if scope is None or scope == DENSE:
        if group_size is not None:
            raise ValueError(
                f"{given('group_size', group_size)} applies only to the grouped scopes {', '.join(GROUPED_SCOPES)}, "
                f"not {given('scope', DENSE if style == 'cli' else scope)}"
            )
        if decompose_stem:
            raise ValueError(f"{name('decompose_stem')} needs an ACDC scope; got {given('scope', scope)}")
        return None
    if scope in GROUPED_SCOPES:
        if group_size is None:
            raise ValueError(f"{given('scope', scope)} needs {name('group_size')} (channels per filter group, e.g. 32)")
        check_positive_int(group_size, name("group_size"))
    elif group_size is not None:
        raise ValueError(
            f"{given('group_size', group_size)} applies only to the grouped scopes {', '.join(GROUPED_SCOPES)}, "
            f"not {given('scope', scope)}"
        )
    return str(scope)
