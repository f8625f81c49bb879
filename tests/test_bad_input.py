"""Bad input to the three command lines (``run_fewshot.py``, ``run_maml.py``, ``run_pretrain.py``), table-driven.

Every case must end the same way: exit code 2, exactly one ``error: ...`` line on stderr naming the flag,
file or value (no traceback), nothing on stdout, and nothing created or changed in ``--out`` (a folder that
did not exist is not created; one that held a run keeps every byte). Crafted files that would run code when
read must not (their command would create a marker file).

The cases are the reliability defects of issue 14 as they reach a user: bad flags and step sizes, seeds out
of range, broken or crafted config files, checkpoints and dataset files, and an ``--out`` that is a file or
already holds a run.
"""

from __future__ import annotations

import os
import pickle
import shlex
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from fewshot.cli import main as fewshot_main
from fewshot.cli.pretrain import main as pretrain_main

MARKER = "marker"  # what a crafted file's command would create in the test folder


class RunsCommand:
    """Pickles as a call of ``os.system(command)``: what an attacker puts into a data file."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def write_mini_pickles(root: Path, class_dict: dict, extra: dict | None = None) -> None:
    """miniImageNet's pickle layout, every split: 4 uint8 images of 8x8, ``class_dict`` and ``extra`` keys."""
    root.mkdir()
    images = np.zeros((4, 8, 8, 3), np.uint8)
    for split in ("train", "val", "test"):
        with open(root / f"mini-imagenet-cache-{split}.pkl", "wb") as f:
            pickle.dump({"image_data": images, "class_dict": class_dict, **(extra or {})}, f)


def make_inputs(tmp: Path) -> None:
    """The bad files of the table, in ``tmp``."""
    touch = RunsCommand(f"touch {shlex.quote(str(tmp / MARKER))}")
    (tmp / "not_yaml.yaml").write_text("lr: [0.1\nways: 5\n")
    (tmp / "twice.yaml").write_text("lr: 0.1\nshots: 1\nlr: 0.2\n")
    (tmp / "big_seed.yaml").write_text("seed: 1.0e+23\n")
    (tmp / "list_lr.yaml").write_text("lr: [0.1, 0.2]\n")
    (tmp / "empty.pt").write_bytes(b"")
    (tmp / "garbage.pt").write_bytes(b"not a checkpoint at all")
    torch.save({"model": touch}, tmp / "crafted.pt")
    (tmp / "a_file").write_text("not a folder\n")
    write_mini_pickles(tmp / "mini_crafted", {"n01": [0, 1], "n02": [2, 3]}, extra={"x": touch})
    write_mini_pickles(tmp / "mini_bad_index", {"n01": [0, 1], "n02": [2, -1]})
    write_mini_pickles(tmp / "mini_not_images", {"n01": [0, 1]})
    with open(tmp / "mini_not_images" / "mini-imagenet-cache-train.pkl", "wb") as f:
        pickle.dump({"image_data": ["abc", "def"], "class_dict": {"n01": [0, 1]}}, f)
    with open(tmp / "mini_not_images" / "mini-imagenet-cache-test.pkl", "wb") as f:
        pickle.dump({"image_data": ["abc", "def"], "class_dict": {"n01": [0, 1]}}, f)
    held = tmp / "held_run"  # a folder that already holds a run
    held.mkdir()
    (held / "last.pt").write_bytes(b"a run's checkpoint")
    (held / "config.yaml").write_text("lr: 0.1\n")


GLYPHS = ["--dataset", "glyphs", "--no-progress", "--width", "4"]
PRETRAIN = ["--dataset", "glyphs", "--backbone", "conv4", "--width", "4", "--epochs", "1", "--no-progress"]
MINI = ["--dataset", "miniimagenet", "--image-size", "16", "--backbone", "conv4"]

# (command line, its arguments ({tmp}: the test folder; --out is added as {tmp}/run unless given), the
# expected part of the error line)
CASES: list[tuple[str, list[str], str]] = [
    # flags and values
    ("maml", ["--shots", "0"], "--shots must be >= 1, got 0"),
    ("maml", ["--inner-lr", "nan"], "--inner-lr must be a finite number > 0, got nan"),
    ("maml", ["--inner-lr", "-0.5"], "--inner-lr must be a finite number > 0, got -0.5"),
    ("fewshot", ["--method", "protonet", "--lr", "inf"], "--lr must be a finite number > 0, got inf"),
    ("fewshot", ["--method", "snail"], "argument --method: invalid choice: 'snail'"),
    ("fewshot", ["--method", "protonet", "--inner-steps", "2"], "--inner-steps does not apply to --method protonet"),
    ("maml", ["--seed", str(10**23)], "--seed must be an integer in 0 .. 2**63 - 1, got 100000000000000000000000"),
    ("maml", ["--seed", "1e23"], "argument --seed: invalid int value: '1e23'"),
    ("fewshot", ["--method", "protonet", "--test-seed", "-1"], "--test-seed must be an integer in 0 .. 2**63 - 1"),
    ("pretrain", ["--lr", "nan"], "--lr must be a finite number > 0, got nan"),
    ("pretrain", ["--seed", "-3"], "--seed must be an integer in 0 .. 2**63 - 1, got -3"),
    ("pretrain", ["--epochs", "0"], "--epochs must be >= 1, got 0"),
    # config files
    ("maml", ["--config", "{tmp}/not_yaml.yaml"], "not_yaml.yaml' is not valid YAML"),
    ("maml", ["--config", "{tmp}/twice.yaml"], "key 'lr' is given twice (lines 1 and 3)"),
    ("fewshot", ["--config", "{tmp}/big_seed.yaml"], "key 'seed' expects an integer, got 1e+23"),
    ("pretrain", ["--config", "{tmp}/twice.yaml"], "key 'lr' is given twice (lines 1 and 3)"),
    ("pretrain", ["--config", "{tmp}/list_lr.yaml"], "key 'lr' expects float, got [0.1, 0.2]"),
    ("maml", ["--config", "{tmp}/missing.yaml"], "missing.yaml' does not exist"),
    # checkpoints
    ("maml", ["--eval-only", "--checkpoint", "{tmp}/empty.pt"], "empty.pt' is empty (0 bytes)"),
    ("maml", ["--eval-only", "--checkpoint", "{tmp}/garbage.pt"], "garbage.pt' cannot be loaded with weights_only"),
    ("maml", ["--eval-only", "--checkpoint", "{tmp}/crafted.pt"], "crafted.pt' cannot be loaded with weights_only"),
    ("pretrain", ["--init-from", "{tmp}/empty.pt"], "empty.pt' is empty (0 bytes)"),
    ("pretrain", ["--init-from", "{tmp}/crafted.pt"], "crafted.pt' cannot be loaded with weights_only"),
    # dataset files
    ("maml", [*MINI, "--data-root", "{tmp}/mini_crafted"], "system, which a dataset pickle never contains"),
    ("pretrain", [*MINI, "--data-root", "{tmp}/mini_crafted"], "system, which a dataset pickle never contains"),
    ("maml", [*MINI, "--data-root", "{tmp}/mini_bad_index"], "class 'n02' has row index -1, outside the valid range"),
    ("pretrain", [*MINI, "--data-root", "{tmp}/mini_not_images"], "'image_data' must be a uint8 array N×H×W×3"),
    ("maml", ["--dataset", "miniimagenet"], "--dataset miniimagenet needs --data-root DIR"),
    # the run folder
    ("maml", ["--out", "{tmp}/a_file"], "is a file, not a folder"),
    ("pretrain", ["--out", "{tmp}/a_file"], "is a file, not a folder"),
    ("maml", ["--out", "{tmp}/held_run"], "held_run already holds a run; pass --resume"),
    ("pretrain", ["--out", "{tmp}/held_run"], "held_run already holds a run; pass --resume"),
    ("maml", ["--resume", "--out", "{tmp}/new_run"], "new_run/last.pt does not exist; start without --resume"),
]


def command(cli: str) -> Callable[[list[str]], object]:
    if cli == "pretrain":
        return pretrain_main
    return lambda argv: fewshot_main(argv, method="maml" if cli == "maml" else None)


def snapshot(folder: Path) -> dict[str, bytes] | None:
    """Every file under ``folder`` with its bytes (None: ``folder`` does not exist)."""
    if not folder.exists():
        return None
    if folder.is_file():
        return {"": folder.read_bytes()}
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("cli, args, expected", CASES, ids=[f"{c}:{' '.join(a)}"[:80] for c, a, _ in CASES])
def test_bad_input_is_one_line_exit_2_and_touches_nothing(tmp_path, monkeypatch, capsys, cli, args, expected):
    monkeypatch.setenv("FEWSHOT_CACHE", str(tmp_path / "cache"))  # a dataset cache would go here
    torch.set_num_threads(1)
    make_inputs(tmp_path)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in args]
    if "--out" not in argv:
        argv += ["--out", str(tmp_path / "run")]
    out = Path(argv[argv.index("--out") + 1])
    before = snapshot(out)
    base = PRETRAIN if cli == "pretrain" else GLYPHS
    if "--dataset" in argv:  # the case names its own dataset
        at = base.index("--dataset")
        base = base[:at] + base[at + 2 :]
    with pytest.raises(SystemExit) as exc:
        command(cli)([*base, *argv])
    captured = capsys.readouterr()
    assert exc.value.code == 2, captured.err
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1, captured.err
    assert "Traceback" not in captured.err and captured.out == ""
    assert expected in captured.err, captured.err
    assert snapshot(out) == before  # nothing created, nothing changed
    assert not (tmp_path / MARKER).exists()  # no crafted command ran
    assert not (tmp_path / "cache" / "miniimagenet").exists() or not any(
        (tmp_path / "cache" / "miniimagenet").iterdir()
    )


def test_the_table_covers_every_command_line_and_each_kind_of_input():
    """A guard against the table shrinking: each CLI, each kind of bad input."""
    clis = {c for c, _, _ in CASES}
    assert clis == {"fewshot", "maml", "pretrain"}
    joined = [" ".join(a) for _, a, _ in CASES]
    for kind in ("--config", "--checkpoint", "--init-from", "--data-root", "--out", "--seed", "--lr"):
        assert any(kind in j for j in joined), kind
    assert len(CASES) >= 30
