#!/usr/bin/env python
"""One MAML meta-training step: ours vs higher (and learn2learn when importable) vs the floor.

The step: a meta-batch of ``--meta-batch`` synthetic 5-way 1-shot 15-query episodes (84×84), ResNet10 /
ResNet18 with Chen et al.'s ImageNet stem (7×7/2 + max-pool) and a linear head, 5 SGD steps at lr 0.01
on each support set, cross-entropy on the query sets, backward to the meta-parameters (the gradients
only: no optimizer step). Configurations: {resnet10, resnet18} × {dense, ACDC-net m=8} × {first, second
order}, named like ``resnet10-acdc-second``. Contenders, timed interleaved round by round in one process:

- ``ours``: ``fewshot.learners.MAML(...).backward_batch(episodes)`` (what the training loop calls),
  default options: the tasks one after the other through the functional inner loop, each task's graph
  freed by its own backward;
- ``ours_vmap``: the same with ``vectorize="all"`` (the tasks through one ``torch.func.vmap``; not in the
  default set: on a CPU it is slower at these widths, see benchmarks/README.md);
- ``higher``: the same step with ``higher.innerloop_ctx(copy_initial_weights=False)``, one task after the
  other (first order: ``track_higher_grads=False`` and the explicit d(query loss)/d(fast weights));
- ``floor``: one plain forward+backward of all the step's images (meta-batch × (support + query)) through
  backbone + head, no inner loop: no MAML implementation can beat it;
- ``bound``: the image passes a first-order step makes, task after task with the same batch sizes
  (``inner_steps`` support forward+backward passes, one query forward+backward), plain autograd on the
  module, weights never updated: what any implementation that runs the tasks one by one on these
  kernels pays at least (second order pays more: its backward runs through the inner steps);
- ``learn2learn``: its ``MAML`` clone/adapt, only when importable (recorded as skipped otherwise).

Before timing, every contender's meta-gradients are compared with ours (``grad_rel_diff``: max |Δ| over
max |ours|); with ``--atom-drop 0`` (the default) they compute the same function. The check is exact in
float64 (``--dtype float64``); in float32 at full size the meta-gradient after 5 inner steps is
ill-conditioned and equivalent implementations differ by up to ~10% (benchmarks/README.md).

Peak memory: on CPU each contender runs its warm-up and one step in a fresh subprocess and reports its
peak RSS (``VmHWM``: includes the interpreter, torch and the model, which the ``idle`` probe — build
everything, run nothing — measures alone); on CUDA ``torch.cuda.max_memory_allocated`` over one step.

    python benchmarks/maml_step.py                            # everything, CPU, 7 rounds
    python benchmarks/maml_step.py --configs 'resnet10-*' --rounds 3
    python benchmarks/maml_step.py --device cuda --meta-batch 16

Writes ``benchmarks/results/maml_step.json`` (or ``--out``) and a markdown table next to it (``.md``).
"""

from __future__ import annotations

import argparse
import fnmatch
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import DTYPES  # noqa: E402

from fewshot.config import cli_main  # noqa: E402
from fewshot.data.episode import Episode  # noqa: E402
from fewshot.learners.maml import MAML  # noqa: E402

DEFAULT_BACKBONES = ("resnet10", "resnet18")
BACKBONE_CHOICES = ("resnet10", "resnet18", "conv4")
CONTENDERS = ("ours", "ours_vmap", "higher", "floor", "bound", "learn2learn")
DEFAULT_CONTENDERS = ("ours", "higher", "floor", "bound", "learn2learn")
PROBES = (*CONTENDERS, "idle")
RATIO_COLUMNS = ("higher", "ours_vmap", "floor", "bound")  # ours / each of these, in the table


@dataclass(frozen=True)
class Config:
    backbone: str
    acdc: bool
    first_order: bool

    @property
    def name(self) -> str:
        return f"{self.backbone}-{'acdc' if self.acdc else 'dense'}-{'first' if self.first_order else 'second'}"


def all_configs(backbones: Sequence[str] = DEFAULT_BACKBONES) -> list[Config]:
    """Every configuration of these backbones: dense / ACDC-net × first / second order."""
    return [Config(b, acdc, fo) for b in backbones for acdc in (False, True) for fo in (True, False)]


def select_configs(patterns: Sequence[str] | None, backbones: Sequence[str] = DEFAULT_BACKBONES) -> list[Config]:
    """The configurations whose name matches one of the glob ``patterns`` (all when None)."""
    configs = all_configs(backbones)
    if not patterns:
        return configs
    names = [c.name for c in configs]
    for pattern in patterns:
        if not fnmatch.filter(names, pattern):
            raise ValueError(f"--configs {pattern!r} matches no configuration; valid: {', '.join(names)}")
    return [c for c in configs if any(fnmatch.fnmatch(c.name, p) for p in patterns)]


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=7, help="timed rounds (each contender once per round)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps per contender first (>= 1)")
    p.add_argument(
        "--backbones",
        nargs="+",
        choices=BACKBONE_CHOICES,
        default=list(DEFAULT_BACKBONES),
        help="resnet10/resnet18 with the ImageNet stem; conv4 (small, for smoke tests)",
    )
    p.add_argument(
        "--configs",
        nargs="+",
        default=None,
        metavar="GLOB",
        help="configuration name patterns, e.g. 'resnet10-*' or '*-second'; names are "
        "BACKBONE-{dense,acdc}-{first,second}",
    )
    p.add_argument(
        "--contenders",
        nargs="+",
        choices=CONTENDERS,
        default=list(DEFAULT_CONTENDERS),
        help=f"default: {' '.join(DEFAULT_CONTENDERS)} (learn2learn only when importable)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--meta-batch", type=int, default=4, help="tasks per meta-batch (larger on CUDA)")
    p.add_argument("--ways", type=int, default=5)
    p.add_argument("--shots", type=int, default=1)
    p.add_argument("--queries", type=int, default=15)
    p.add_argument("--image-size", type=int, default=84)
    p.add_argument("--inner-steps", type=int, default=5)
    p.add_argument("--inner-lr", type=float, default=0.01)
    p.add_argument("--atoms", type=int, default=8, help="ACDC atoms m")
    p.add_argument(
        "--atom-drop",
        type=float,
        default=0.0,
        help="ACDC atom-drop in training (default 0: every contender computes the same function)",
    )
    p.add_argument(
        "--dtype",
        choices=tuple(DTYPES),
        default="float32",
        help="float64 makes the meta-gradient check exact (float32 meta-gradients of equivalent "
        "implementations differ by up to ~10%% after 5 inner steps: see README)",
    )
    p.add_argument(
        "--memory",
        choices=("rss", "none"),
        default="rss",
        help="rss: peak RSS of each contender in a fresh subprocess (CPU); none: skip. "
        "CUDA always reports max_memory_allocated",
    )
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/maml_step.json)")
    p.add_argument("--probe", choices=PROBES, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for name in ("rounds", "warmup", "meta_batch", "ways", "shots", "queries", "image_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.inner_steps < 0:
        raise ValueError(f"--inner-steps must be >= 0, got {args.inner_steps}")
    return args


# --------------------------------------------------------------------------------------------------
def make_episodes(args: argparse.Namespace, device: torch.device) -> list[Episode]:
    """``meta_batch`` synthetic episodes whose classes differ by a per-channel mean (fixed seed)."""
    g = torch.Generator().manual_seed(1234)
    return [common.synthetic_episode(g, args, DTYPES[args.dtype]).to(device) for _ in range(args.meta_batch)]


def build_learner(config: Config, args: argparse.Namespace, device: torch.device, vectorize: str = "off") -> MAML:
    """The MAML learner of a configuration; the same seed, hence the same weights, every time."""
    from fewshot import create_backbone

    torch.manual_seed(0)
    acdc = {"acdc": "net", "atoms": args.atoms, "atom_drop": args.atom_drop} if config.acdc else {}
    options = {"image_size": args.image_size} if config.backbone == "conv4" else {"stem": "imagenet"}
    backbone = create_backbone(config.backbone, **options, **acdc)
    learner = MAML(
        backbone,
        ways=args.ways,
        inner_steps=args.inner_steps,
        inner_lr=args.inner_lr,
        first_order=config.first_order,
        vectorize=vectorize,
    )
    return learner.to(device=device, dtype=DTYPES[args.dtype]).train()


def ours_step(learner: MAML, episodes: list[Episode]) -> Callable[[], None]:
    def step() -> None:
        learner.zero_grad(set_to_none=True)
        learner.backward_batch(episodes)  # what the training loop calls

    return step


def higher_step(model: MAML, episodes: list[Episode], config: Config, args: argparse.Namespace) -> Callable[[], None]:
    """The step as a user writes it with higher: one ``innerloop_ctx`` per task, model = backbone + head."""
    import higher

    params = list(model.parameters())
    inner_opt = torch.optim.SGD(params, lr=args.inner_lr)

    def step() -> None:
        model.zero_grad(set_to_none=True)
        for ep in episodes:
            with higher.innerloop_ctx(
                model, inner_opt, copy_initial_weights=False, track_higher_grads=not config.first_order
            ) as (fmodel, diffopt):
                for _ in range(args.inner_steps):
                    diffopt.step(F.cross_entropy(fmodel(ep.support_images), ep.support_labels))
                query_loss = F.cross_entropy(fmodel(ep.query_images), ep.query_labels)
                if config.first_order:  # the adapted weights are detached: d(query)/d(fast) explicitly
                    grads = torch.autograd.grad(query_loss, list(fmodel.parameters()))
                    for p, g in zip(params, grads):
                        p.grad = g if p.grad is None else p.grad + g
                else:
                    query_loss.backward()

    return step


def learn2learn_step(
    model: MAML, episodes: list[Episode], config: Config, args: argparse.Namespace
) -> Callable[[], None]:
    """learn2learn's clone/adapt MAML (only built when learn2learn imports; not exercised here)."""
    import learn2learn as l2l

    maml = l2l.algorithms.MAML(model, lr=args.inner_lr, first_order=config.first_order)

    def step() -> None:
        maml.zero_grad(set_to_none=True)
        for ep in episodes:
            task_model = maml.clone()
            for _ in range(args.inner_steps):
                task_model.adapt(F.cross_entropy(task_model(ep.support_images), ep.support_labels))
            F.cross_entropy(task_model(ep.query_images), ep.query_labels).backward()

    return step


def floor_step(model: MAML, episodes: list[Episode]) -> Callable[[], None]:
    """One forward+backward of every image of the step (support and query of all tasks) in one batch."""
    images = torch.cat([t for e in episodes for t in (e.support_images, e.query_images)])
    labels = torch.cat([t for e in episodes for t in (e.support_labels, e.query_labels)])

    def step() -> None:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(images), labels).backward()

    return step


def bound_step(model: MAML, episodes: list[Episode], args: argparse.Namespace) -> Callable[[], None]:
    """A first-order step's image passes, task by task, on fixed weights: plain forward+backward of each
    support set ``inner_steps`` times (gradients returned, not applied) and of each query set once."""
    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> None:
        model.zero_grad(set_to_none=True)
        for ep in episodes:
            for _ in range(args.inner_steps):
                torch.autograd.grad(F.cross_entropy(model(ep.support_images), ep.support_labels), params)
            F.cross_entropy(model(ep.query_images), ep.query_labels).backward()

    return step


def learn2learn_status() -> str | None:
    """None when learn2learn imports, else why not."""
    try:
        import learn2learn  # noqa: F401
    except Exception as exc:  # ImportError, or its C extensions failing on this Python
        return f"skipped: learn2learn is not importable ({type(exc).__name__}: {exc})"
    return None


def build_contender(
    name: str, config: Config, args: argparse.Namespace, device: torch.device, episodes: list[Episode]
) -> tuple[MAML, Callable[[], None]]:
    """The model a contender updates and its step function (each contender gets its own model)."""
    learner = build_learner(config, args, device, vectorize="all" if name == "ours_vmap" else "off")
    if name in ("ours", "ours_vmap"):
        return learner, ours_step(learner, episodes)
    if name == "higher":
        return learner, higher_step(learner, episodes, config, args)
    if name == "learn2learn":
        return learner, learn2learn_step(learner, episodes, config, args)
    if name == "floor":
        return learner, floor_step(learner, episodes)
    if name == "bound":
        return learner, bound_step(learner, episodes, args)
    raise ValueError(f"unknown contender {name!r}; valid: {', '.join(CONTENDERS)}")


def gradients(model: MAML) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def relative_difference(grads: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    """max |grads - reference| / max |reference| over all parameters (inf if the names differ)."""
    if grads.keys() != reference.keys():
        return float("inf")
    diff = max((grads[n] - reference[n]).abs().max().item() for n in reference)
    scale = max(reference[n].abs().max().item() for n in reference)
    return diff / scale if scale > 0 else diff


# --------------------------------------------------------------------------------------------------
def probe_argv(args: argparse.Namespace, config: Config, contender: str) -> list[str]:
    """The command line of a memory probe: this run's settings, one configuration, one contender."""
    argv = [
        "--backbones",
        config.backbone,
        "--configs",
        config.name,
        "--probe",
        contender,
        "--device",
        args.device,
        "--warmup",
        str(args.warmup),
    ]
    for flag in (
        "meta_batch",
        "ways",
        "shots",
        "queries",
        "image_size",
        "inner_steps",
        "inner_lr",
        "atoms",
        "atom_drop",
        "threads",
        "dtype",
    ):
        value = getattr(args, flag)
        if value is not None:
            argv += [f"--{flag.replace('_', '-')}", str(value)]
    return argv


def run_probe_mode(args: argparse.Namespace, device: torch.device) -> None:
    """Child side of a memory probe: build one contender, run warm-up + one step, report peak RSS."""
    (config,) = select_configs(args.configs, args.backbones)
    episodes = make_episodes(args, device)
    if args.probe == "idle":
        build_learner(config, args, device)
    else:
        _, step = build_contender(args.probe, config, args, device, episodes)
        for _ in range(args.warmup + 1):
            step()
    common.emit_probe({"contender": args.probe, "config": config.name, "peak_rss_mib": round(common.peak_rss_mib(), 1)})


def measure_config(
    config: Config, args: argparse.Namespace, device: torch.device, contenders: list[str]
) -> dict[str, Any]:
    """Gradient check, warm-up, interleaved timing and peak memory of one configuration."""
    sync = common.synchronizer(device)
    episodes = make_episodes(args, device)
    built = {name: build_contender(name, config, args, device, episodes) for name in contenders}
    parameters = sum(p.numel() for p in built[contenders[0]][0].parameters())

    grads = {}
    for name, (model, step) in built.items():  # first warm-up step doubles as the gradient check
        step()
        grads[name] = gradients(model)
        for _ in range(args.warmup - 1):
            step()
    sync()
    reference = grads.get("ours")
    grad_rel_diff = (
        {n: relative_difference(g, reference) for n, g in grads.items() if n not in ("ours", "floor", "bound")}
        if reference is not None
        else {}
    )

    def progress(r: int, seconds: dict[str, float]) -> None:
        shown = "  ".join(f"{n} {1000 * s:8.1f}" for n, s in seconds.items())
        print(f"  {config.name} round {r + 1}/{args.rounds}: {shown} ms", flush=True)

    times = common.interleaved_times({n: s for n, (_, s) in built.items()}, args.rounds, sync, progress)
    stats = {n: common.summarize_ms(t) for n, t in times.items()}

    if device.type == "cuda":
        for name, (_, step) in built.items():
            torch.cuda.reset_peak_memory_stats(device)
            step()
            sync()
            stats[name]["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    del built, grads
    row: dict[str, Any] = {
        "backbone": config.backbone,
        "acdc": "net" if config.acdc else "none",
        "atoms": args.atoms if config.acdc else None,
        "atom_drop": args.atom_drop if config.acdc else None,
        "first_order": config.first_order,
        "parameters": parameters,
        "contenders": stats,
        "grad_rel_diff_vs_ours": grad_rel_diff,
    }
    if device.type == "cpu" and args.memory == "rss":
        script = Path(__file__).resolve()
        row["idle_rss_mib"] = common.run_probe(script, probe_argv(args, config, "idle"))["peak_rss_mib"]
        for name in contenders:
            stats[name]["peak_rss_mib"] = common.run_probe(script, probe_argv(args, config, name))["peak_rss_mib"]
    for name in contenders:
        row[f"{name}_ms"] = stats[name]["median_ms"]
    if "ours" in stats:
        for other in RATIO_COLUMNS + ("learn2learn",):
            if other in stats:  # < 1: ours is faster
                row[f"ratio_vs_{other}"] = round(stats["ours"]["median_ms"] / stats[other]["median_ms"], 4)
    if "higher" in stats and "bound" in stats:  # how far above the first-order passes the reference runs
        row["higher_vs_bound"] = round(stats["higher"]["median_ms"] / stats["bound"]["median_ms"], 4)
    return row


def table(configs: dict[str, dict[str, Any]], contenders: list[str]) -> str:
    """Markdown: median ms (IQR) per contender, ours relative to higher / the floor, peak memory."""
    memory_key = next(
        (
            k
            for k in ("peak_rss_mib", "peak_cuda_mib")
            for r in configs.values()
            for s in r["contenders"].values()
            if k in s
        ),
        None,
    )
    header = ["configuration", "params (M)"] + [f"{c} ms (IQR)" for c in contenders]
    header += [f"ours/{c}" for c in RATIO_COLUMNS if c in contenders and "ours" in contenders]
    if "higher" in contenders and "bound" in contenders:
        header.append("higher/bound")
    if memory_key:
        header += [f"{c} {'RSS' if memory_key == 'peak_rss_mib' else 'CUDA'} MiB" for c in contenders]
    rows = []
    for name, r in configs.items():
        s = r["contenders"]
        cells: list[Any] = [name, round(r["parameters"] / 1e6, 2)]
        cells += [f"{s[c]['median_ms']:.0f} ({s[c]['iqr_ms']:.0f})" for c in contenders]
        cells += [r[f"ratio_vs_{c}"] for c in RATIO_COLUMNS if f"ratio_vs_{c}" in r]
        if "higher_vs_bound" in r:
            cells.append(r["higher_vs_bound"])
        if memory_key:
            cells += [s[c].get(memory_key) for c in contenders]
        rows.append(cells)
    return common.markdown_table(header, rows)


@cli_main
def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    device = common.prepare_device(args.device, args.threads)
    if args.probe is not None:
        run_probe_mode(args, device)
        return {}
    configs = select_configs(args.configs, args.backbones)
    contenders = list(dict.fromkeys(args.contenders))
    l2l_note = learn2learn_status() if "learn2learn" in contenders else "not requested"
    if l2l_note and "learn2learn" in contenders:
        contenders.remove("learn2learn")
    start = time.perf_counter()
    result: dict[str, Any] = {
        "benchmark": "maml_step",
        "command": common.command_line("maml_step", argv),
        "machine": common.machine(device),
        "settings": {
            "meta_batch": args.meta_batch,
            "ways": args.ways,
            "shots": args.shots,
            "queries": args.queries,
            "image_size": args.image_size,
            "stem": "imagenet (ResNets)",
            "inner_steps": args.inner_steps,
            "inner_lr": args.inner_lr,
            "dtype": args.dtype,
            "rounds": args.rounds,
            "warmup": args.warmup,
            "memory": args.memory,
        },
        "learn2learn": l2l_note or "measured",
        "notes": "ratio_vs_X = ours median / X median (< 1: ours faster). Medians over interleaved rounds; "
        "compare only figures of one run. peak_rss_mib: fresh subprocess per contender, includes "
        "interpreter + torch + model (see idle_rss_mib). grad_rel_diff_vs_ours: max|g - g_ours| / "
        "max|g_ours|; exact only in float64 (float32: up to ~10% at full size, see README).",
        "configs": {},
    }
    for config in configs:
        print(f"{config.name}: {', '.join(contenders)}", flush=True)
        result["configs"][config.name] = measure_config(config, args, device, contenders)
    result["machine"]["load_average_1min_at_end"] = common.load_average()
    result["seconds"] = round(time.perf_counter() - start, 1)
    markdown = table(result["configs"], contenders)
    print(markdown)
    out = common.save_result(args.out, "maml_step", result)
    out.with_suffix(".md").write_text(markdown + "\n")
    print(f"wrote {out.with_suffix('.md')}")
    return result


if __name__ == "__main__":
    main()
