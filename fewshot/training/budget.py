"""The wall-clock training budget (``--train-seconds``) shared by the episodic and supervised loops."""

from __future__ import annotations

import math


def check_train_seconds(seconds: float | None) -> float | None:
    """``seconds`` if it is None (no budget) or a positive, finite number; else a ValueError saying so."""
    if seconds is not None and not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"--train-seconds must be a positive number of seconds, got {seconds}")
    return seconds
