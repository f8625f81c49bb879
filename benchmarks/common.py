"""Shared helpers of the benchmark scripts: interleaved timing, robust summaries, peak memory, JSON.

Timing protocol (every script): the contenders of one comparison are built once, warmed up, then timed
round by round in ONE process; round ``r`` runs each contender once, in an order rotated by ``r``, so a
slow spell of a shared machine hits every contender alike. Report medians and interquartile ranges;
compare only figures of one interleaved run.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

RESULTS = Path(__file__).resolve().parent / "results"
PROBE_PREFIX = "PROBE-RESULT "


DTYPES = {"float32": torch.float32, "float64": torch.float64}


def synthetic_episode(g: torch.Generator, args: Any, dtype: torch.dtype, channels: int = 3) -> Any:
    """A synthetic episode of ``channels``-channel images whose classes differ by a per-channel mean, drawn
    from ``g`` (``args`` gives ways, shots, queries, image_size)."""
    from fewshot.data.episode import Episode

    means = torch.randn(args.ways, channels, 1, 1, generator=g)
    labels_s = torch.arange(args.ways).repeat_interleave(args.shots)
    labels_q = torch.arange(args.ways).repeat_interleave(args.queries)
    shape = (channels, args.image_size, args.image_size)
    support = (means[labels_s] + torch.randn(len(labels_s), *shape, generator=g)).to(dtype)
    query = (means[labels_q] + torch.randn(len(labels_q), *shape, generator=g)).to(dtype)
    return Episode(support, labels_s, query, labels_q, torch.arange(args.ways))


def synchronizer(device: torch.device) -> Callable[[], None]:
    """A function waiting for the device's queued work (a no-op on CPU)."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def rotated(names: Sequence[str], round_index: int) -> list[str]:
    """``names`` rotated left by ``round_index`` (the order of that round)."""
    k = round_index % len(names) if names else 0
    return list(names[k:]) + list(names[:k])


def interleaved_times(
    contenders: Mapping[str, Callable[[], Any]],
    rounds: int,
    sync: Callable[[], None] = lambda: None,
    on_round: Callable[[int, dict[str, float]], None] | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of each contender, ``rounds`` calls each, interleaved round by round.

    The clock is read after ``sync()`` on both sides, so queued GPU work is counted.
    ``on_round(r, seconds_by_name)`` is called after each round (progress printing).
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    names = list(contenders)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        this_round: dict[str, float] = {}
        for name in rotated(names, r):
            sync()
            start = time.perf_counter()
            contenders[name]()
            sync()
            this_round[name] = time.perf_counter() - start
            times[name].append(this_round[name])
        if on_round is not None:
            on_round(r, this_round)
    return times


def quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    """(first quartile, median, third quartile); inclusive method, so one value gives (v, v, v)."""
    if not values:
        raise ValueError("quartiles of an empty sequence")
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def summarize_ms(seconds: Sequence[float]) -> dict[str, Any]:
    """Median, quartiles and interquartile range in milliseconds, plus every sample."""
    ms = [1000.0 * s for s in seconds]
    q1, median, q3 = quartiles(ms)
    return {
        "median_ms": round(median, 3),
        "q1_ms": round(q1, 3),
        "q3_ms": round(q3, 3),
        "iqr_ms": round(q3 - q1, 3),
        "samples": len(ms),
        "times_ms": [round(t, 3) for t in ms],
    }


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, in MiB.

    Linux: ``VmHWM`` of ``/proc/self/status``, the high-water mark of this process's own memory map.
    Not ``ru_maxrss``: Linux carries that across ``fork`` + ``exec``, so a probe started from a large
    parent would report the parent's peak. Elsewhere ``ru_maxrss`` (bytes on macOS, KiB otherwise).
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    scale = 1.0 if sys.platform == "darwin" else 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20


def emit_probe(payload: Mapping[str, Any]) -> None:
    """Print a probe's result as the one line :func:`run_probe` looks for."""
    print(PROBE_PREFIX + json.dumps(dict(payload)), flush=True)


def run_probe(script: Path, argv: Sequence[str], timeout: float | None = None) -> dict[str, Any]:
    """Run ``python script *argv`` in a fresh process and return the payload of its ``emit_probe`` line.

    A fresh interpreter per measurement makes its :func:`peak_rss_mib` the peak of that one contender
    (plus the interpreter, torch and the model, which an ``idle`` probe measures on its own).
    """
    done = subprocess.run(
        [sys.executable, str(script), *argv], capture_output=True, text=True, timeout=timeout, cwd=REPO
    )
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(PROBE_PREFIX):
            return json.loads(line[len(PROBE_PREFIX) :])
    raise RuntimeError(
        f"memory probe {script.name} {' '.join(argv)} failed (exit {done.returncode}):\n{done.stderr[-2000:]}"
    )


def set_threads(threads: int | None) -> None:
    """``torch.set_num_threads`` when given (>= 1); None keeps torch's default."""
    if threads is None:
        return
    if threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)


def machine(device: torch.device) -> dict[str, Any]:
    """What the numbers were measured on, including the load when the run started."""
    info: dict[str, Any] = {
        "device": str(device),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
    }
    if hasattr(os, "getloadavg"):
        info["load_average_1min_at_start"] = round(os.getloadavg()[0], 2)
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
    return info


def load_average() -> float | None:
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None


def write_json(path: str | os.PathLike, payload: Mapping[str, Any]) -> Path:
    """Write ``payload`` atomically (the project's ``fewshot.io.write_json``)."""
    from fewshot.io import write_json

    return write_json(path, dict(payload))


def prepare_device(name: str, threads: int | None) -> torch.device:
    """A script's ``--device`` (cpu, cuda, cuda:N, auto) with ``--threads`` applied and, on CUDA, cuDNN
    autotuning on (every script times steady-state shapes)."""
    from fewshot.training.distributed import resolve_device

    device = resolve_device(name)
    set_threads(threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return device


def command_line(script: str, argv: Sequence[str] | None) -> str:
    """How this run was invoked, for the JSON record: ``python benchmarks/<script>.py ARGS``."""
    return f"python benchmarks/{script}.py " + " ".join(argv if argv is not None else sys.argv[1:])


def result_path(out: str | None, script: str) -> Path:
    """``--out`` if given, else ``benchmarks/results/<script>.json``."""
    return Path(out) if out else RESULTS / f"{script}.json"


def save_result(out: str | None, script: str, payload: Mapping[str, Any]) -> Path:
    """Write a script's JSON result atomically to :func:`result_path` and say where; returns the path."""
    path = write_json(result_path(out, script), payload)
    print(f"wrote {path}")
    return path


def finish_result(out: str | None, script: str, payload: dict[str, Any], started: float) -> dict[str, Any]:
    """Add the load average at the end and the seconds since ``started`` (a ``time.perf_counter()``
    reading) to ``payload``, save it (:func:`save_result`) and return it."""
    payload["machine"]["load_average_1min_at_end"] = load_average()
    payload["seconds"] = round(time.perf_counter() - started, 1)
    save_result(out, script, payload)
    return payload


def measure_configs(
    script: str,
    argv: Sequence[str] | None,
    args: Any,
    measure: Callable[[str, Any], dict[str, Any]],
    settings: Mapping[str, Any],
    notes: str,
) -> dict[str, Any]:
    """The run of a per-configuration CPU benchmark: ``measure(name, args)`` for each of ``args.configs``
    on ``args.threads`` threads, recorded with the command, the machine, ``settings`` and ``notes``, and
    saved to ``args.out`` (:func:`finish_result`)."""
    started = time.perf_counter()
    device = prepare_device("cpu", args.threads)
    payload: dict[str, Any] = {
        "benchmark": script,
        "command": command_line(script, argv),
        "machine": machine(device),
        "settings": dict(settings),
        "configs": {name: measure(name, args) for name in args.configs},
        "notes": notes,
    }
    return finish_result(args.out, script, payload, started)


def timed_ratio(
    label: str, contenders: Mapping[str, Callable[[], Any]], rounds: int, numerator: str, denominator: str
) -> dict[str, Any]:
    """Warm each contender up once, time them interleaved over ``rounds`` (:func:`interleaved_times`),
    print one line under ``label`` and return :func:`ratio_of_rounds` of ``numerator`` over ``denominator``."""
    for fn in contenders.values():
        fn()
    row = ratio_of_rounds(interleaved_times(contenders, rounds), numerator, denominator)
    medians = {name: row["contenders"][name]["median_ms"] for name in (denominator, numerator)}
    print(
        f"{label}: {denominator} {medians[denominator]:.0f} ms, {numerator} {medians[numerator]:.0f} ms, "
        f"ratio {row['ratio']:.2f} (IQR {row['ratio_iqr']:.2f})",
        flush=True,
    )
    return row


def ratio_of_rounds(times: Mapping[str, Sequence[float]], numerator: str, denominator: str) -> dict[str, Any]:
    """The median over rounds of ``numerator``'s seconds over ``denominator``'s in the same round
    (``ratio``), its interquartile range (``ratio_iqr``) and every contender's :func:`summarize_ms`."""
    q1, ratio, q3 = quartiles(sorted(n / d for n, d in zip(times[numerator], times[denominator])))
    return {
        "ratio": round(ratio, 4),
        "ratio_iqr": round(q3 - q1, 4),
        "contenders": {name: summarize_ms(t) for name, t in times.items()},
    }


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; floats get one decimal."""

    def cell(v: Any) -> str:
        if v is None:
            return "–"
        if isinstance(v, float):
            return f"{v:.1f}" if abs(v) >= 10 else f"{v:.3g}"
        return str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def write_settings(settings: Mapping[str, Any], path: Path) -> Path:
    """Write ``settings`` (keys as in a run's config.yaml; None values left out) as a ``--config`` file.

    A config file rather than flags: every option type reads back as the CLI means it (e.g. ``fce:
    false`` for an option that is on by default, which no single flag spelling covers for all options)."""
    import yaml

    path.write_text(yaml.safe_dump({k: v for k, v in settings.items() if v is not None}, sort_keys=False))
    return path


def run_fewshot_cli(script: str, settings: Mapping[str, Any], out: Path, threads: int) -> dict[str, Any]:
    """Run ``script`` (run_maml.py or run_fewshot.py) in a subprocess with ``settings`` (as a ``--config``
    file) and ``--out out`` at ``threads`` torch threads; returns its ``result.json`` record
    (RuntimeError with its stderr if it fails)."""
    import tempfile

    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    with tempfile.TemporaryDirectory() as tmp:
        config = write_settings(settings, Path(tmp) / "settings.yaml")
        argv = [sys.executable, str(root / script), "--config", str(config), "--out", str(out), "--no-progress"]
        done = subprocess.run(argv, cwd=root, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(
            f"run failed ({done.returncode}): {' '.join(argv)} with {dict(settings)}\n{done.stderr[-2000:]}"
        )
    return json.loads((out / "result.json").read_text())


def measure_cells(
    cells: Sequence[Any],
    measure_one: Callable[[Any], dict[str, Any]],
    keep: Callable[[Any, dict[str, Any]], None],
    jobs: int,
) -> None:
    """``measure_one(cell)`` for every cell, ``jobs`` at a time (threads, each waiting on its own run's
    subprocess); ``keep(cell, record)`` runs under one lock as each run finishes (write the results file
    there, so a finished cell is never lost). A failed run's error is raised."""
    lock = threading.Lock()

    def one(cell: Any) -> None:
        record = measure_one(cell)
        with lock:
            keep(cell, record)

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for _ in pool.map(one, cells):
            pass
