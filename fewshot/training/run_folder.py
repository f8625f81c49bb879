"""The files of a run folder: the same names for every kind of run (few-shot, pretraining).

config.yaml   the resolved options (reloads with ``--config``)
log.jsonl     one JSON record per line, each with the ``step`` it was written at
last.pt       the latest checkpoint: what ``--resume`` continues from
best.pt       the checkpoint of the best validation accuracy (episodic training and the Baselines)
result.json   the final record
eval_config.yaml, eval_result.json   the options and the record of an ``--eval-only`` run into the folder
              (the training run's own config.yaml and result.json are never overwritten by one)
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

CONFIG = "config.yaml"
LOG = "log.jsonl"
LAST = "last.pt"
BEST = "best.pt"
RESULT = "result.json"
EVAL_CONFIG = "eval_config.yaml"
EVAL_RESULT = "eval_result.json"


class JsonlLog:
    """Append-only ``log.jsonl``: one JSON record per line, flushed as written. ``path=None`` writes nothing.

    ``start(resume_step)`` begins a run's log: a fresh run (``None``) drops an old log; a resumed run keeps the
    records up to the checkpoint's step and drops those written after it (they belong to a part of the run
    that did not reach a checkpoint and will be trained again)."""

    def __init__(self, path: str | Path | None) -> None:
        self.path = None if path is None else Path(path)

    def start(self, resume_step: int | None = None) -> None:
        if self.path is None or not self.path.exists():
            return
        if resume_step is None:
            self.path.unlink()
            return
        kept = [
            line
            for line in self.path.read_text().splitlines()
            if line and json.loads(line).get("step", 0) <= resume_step
        ]
        self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: Mapping[str, Any]) -> None:
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(record, sort_keys=True) + "\n")


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporary checkpoint files (``.last.pt.*.tmp``, ``.best.pt.*.tmp``) a killed run left in its
    folder (each can be as large as a checkpoint). Called when a run starts in the folder: one run uses a folder
    at a time, so no other process is writing them. Returns what was deleted."""
    folder = Path(folder)
    stale = [p for name in (LAST, BEST) for p in folder.glob(f".{name}.*.tmp") if p.is_file()]
    for path in stale:
        path.unlink(missing_ok=True)
    return stale
