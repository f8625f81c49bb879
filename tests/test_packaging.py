"""The package works without the source tree: a wheel built from the repository, installed into a fresh
virtual environment (no dependencies: it reuses this interpreter's torch), loads its package data."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import venv
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHECK = """
import json, fewshot, fewshot.data
split = fewshot.data.load_class_split()
print(json.dumps({"file": fewshot.__file__, "sizes": {k: len(v) for k, v in split.items()}}))
"""


def test_wheel_ships_the_split_file_and_loads_it_outside_the_source_tree(tmp_path):
    source = tmp_path / "source"  # a copy: building in place would leave build/ in the repository
    shutil.copytree(REPO / "fewshot", source / "fewshot", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    wheels = tmp_path / "wheels"
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(wheels),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    (wheel,) = wheels.glob("acdc_fewshot-*.whl")
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q", str(wheel)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert install.returncode == 0, install.stderr[-2000:]
    run = subprocess.run([str(python), "-I", "-c", CHECK], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    found = json.loads(run.stdout.strip().splitlines()[-1])
    assert Path(found["file"]).resolve().is_relative_to(env_dir.resolve()), found["file"]  # the wheel's copy
    assert found["sizes"] == {"train": 64, "val": 16, "test": 20}
