"""Supervised (pre)training of any registry backbone, dense or ACDC, on a whole classification dataset:
``run_pretrain.py`` and the console script ``fewshot-pretrain``.

Examples::

    python run_pretrain.py --config configs/pretrain_cifar10.yaml --data-root ~/data --acdc net --atoms 8
    torchrun --nproc_per_node 4 run_pretrain.py --config configs/pretrain_imagenet.yaml --data-root /imagenet
    python run_pretrain.py --config runs/x/config.yaml --resume          # continue runs/x exactly
    python run_pretrain.py --config configs/pretrain_cifar10.yaml --data-root ~/data --backbone wrn28_10 \\
        --acdc net --atoms 8 --init-from runs/wrn_net8/last.pt --expand-scope block --expand-atoms 12

Writes the run folder ``--out`` (``fewshot.training.run_folder``): ``config.yaml`` (the resolved options),
``last.pt`` (after every epoch; resumable, loadable in one process), ``log.jsonl`` (one line per epoch) and
``result.json``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from fewshot.acdc.rules import GROUPED_SCOPES, SCOPES, check_acdc_options
from fewshot.cli.common import (
    MEMORY_FORMATS,
    OneLineParser,
    add_backbone_options,
    add_memory_format_option,
    add_run_options,
    check_at_least,
    check_number,
    check_out_folder,
    check_seeds,
    resolved_memory_format,
)
from fewshot.config import cli_main, parse_args_with_config, save_config, to_yaml_value
from fewshot.data import list_datasets
from fewshot.io import write_json
from fewshot.training.checkpoint import ModelSpec, check_model_spec, load_checkpoint, load_model_state
from fewshot.training.run_folder import CONFIG, LAST, RESULT

# Backbone options with a flag of their own: --backbone-arg refuses them (one way to give each).
OWN_FLAGS = {"width": "--width", "stem": "--stem", "in_channels": "the dataset", "image_size": "--image-size"}


def parse_backbone_args(items: Sequence[str] | None) -> dict[str, Any]:
    """``["depth=16", "widen_factor=4"]`` -> ``{"depth": 16, "widen_factor": 4}`` (values read as YAML scalars)."""
    import yaml

    out: dict[str, Any] = {}
    for text in items or []:
        key, sep, value = str(text).partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--backbone-arg expects KEY=VALUE (e.g. depth=16), got {text!r}")
        try:
            out[key.strip()] = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ValueError(f"--backbone-arg {text!r}: cannot read the value {value!r}") from None
    return out


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="run_pretrain.py", description=__doc__.splitlines()[0])
    _add_data_options(p)
    _add_model_options(p)
    _add_optimization_options(p)
    _add_runtime_options(p)
    _add_growth_options(p)
    return p


def _add_data_options(p: argparse.ArgumentParser) -> None:
    """--dataset, --data-root, --image-size, --holdout, --augment, --workers."""
    d = p.add_argument_group("data")
    d.add_argument(
        "--dataset",
        required=True,
        choices=list_datasets(),
        help="a registered dataset; the few-shot ones (miniimagenet, glyphs) give their base classes",
    )
    d.add_argument(
        "--data-root",
        default=None,
        help="dataset folder (CIFAR: holding cifar-10-batches-py/); glyphs: where the rendered glyphs are cached "
        "(default $FEWSHOT_CACHE or ~/.cache/fewshot)",
    )
    d.add_argument("--image-size", type=int, default=None, help="default: the dataset's (32, 224, 64, 84, 28)")
    d.add_argument(
        "--holdout",
        type=float,
        default=None,
        help="few-shot datasets: fraction of each base class held out for validation (0.05)",
    )
    d.add_argument("--augment", choices=("standard", "none"), default="standard")
    d.add_argument(
        "--workers",
        type=int,
        default=4 if (os.cpu_count() or 1) > 4 else 0,
        help="DataLoader worker processes per training process",
    )


def _add_model_options(p: argparse.ArgumentParser) -> None:
    """The shared backbone/ACDC options, --backbone-arg and --decompose-stem."""
    m = add_backbone_options(p, None, default=None)
    m.add_argument(
        "--backbone-arg",
        dest="backbone_args",
        action="append",
        default=None,
        metavar="KEY=VALUE",
        help="another option of the backbone, e.g. depth=16 or widen_factor=4 for wrn (repeatable)",
    )
    m.add_argument("--decompose-stem", action="store_true", help="also decompose the ImageNet 7x7 stem")


def _add_optimization_options(p: argparse.ArgumentParser) -> None:
    """Optimizer, learning-rate schedule and epochs."""
    o = p.add_argument_group("optimization (App. A: SGD 0.1, momentum 0.9)")
    o.add_argument("--epochs", type=int, default=350)
    o.add_argument("--batch-size", type=int, default=128, help="images per step and process")
    o.add_argument("--eval-batch-size", type=int, default=None)
    o.add_argument("--optimizer", choices=("sgd", "adam", "adamw"), default="sgd")
    o.add_argument("--lr", type=float, default=0.1)
    o.add_argument("--momentum", type=float, default=0.9)
    o.add_argument("--weight-decay", type=float, default=1e-4)
    o.add_argument("--nesterov", action="store_true")
    o.add_argument("--schedule", choices=("multistep", "step", "cosine", "constant"), default="multistep")
    o.add_argument(
        "--milestones", type=int, nargs="+", default=None, help="multistep: epochs of lr x gamma (default 150 250)"
    )
    o.add_argument("--gamma", type=float, default=0.1)
    o.add_argument("--step-size", type=int, default=30, help="step: epochs between lr x gamma")
    o.add_argument("--label-smoothing", type=float, default=0.0)


def _add_runtime_options(p: argparse.ArgumentParser) -> None:
    """The shared run options, mixed precision, compilation, evaluation and checkpoint cadence."""
    r = add_run_options(p, default_out="runs/pretrain/<dataset>_<backbone>_<acdc>")
    r.add_argument("--amp", choices=("off", "bf16", "fp16"), default="off", help="mixed precision")
    add_memory_format_option(r)
    r.add_argument("--compile", action="store_true", help="torch.compile the model")
    r.add_argument("--sync-batchnorm", action="store_true", help="SyncBatchNorm under torchrun")
    r.add_argument("--eval-every", type=int, default=1, help="epochs between validations (and the last)")
    r.add_argument("--save-every-steps", type=int, default=0, help="also checkpoint every N steps (0: per epoch)")
    r.add_argument(
        "--stop-at-step",
        type=int,
        default=0,
        help="checkpoint and stop once this many steps are done, 0: never (continue with --resume)",
    )


def _add_growth_options(p: argparse.ArgumentParser) -> None:
    """--init-from, --expand-scope, --expand-atoms."""
    g = p.add_argument_group("capacity growth (App. E)")
    g.add_argument(
        "--init-from",
        default=None,
        metavar="CHECKPOINT",
        help="start from these weights (fresh optimizer and schedule)",
    )
    g.add_argument(
        "--expand-scope",
        choices=SCOPES,
        default=None,
        help="after --init-from: relax coefficient sharing to this scope",
    )
    g.add_argument("--expand-atoms", type=int, default=None, help="after --init-from: grow to this many atoms")


def check_args(args: argparse.Namespace) -> None:
    """Refuse combinations that would be ignored or cannot work, naming the flags."""
    check_number(args, "lr")
    check_number(args, "gamma")
    for name in ("momentum", "weight_decay"):
        check_number(args, name, strict=False)
    check_number(args, "label_smoothing", strict=False, below=1.0)
    check_at_least(args, ("epochs", "batch_size"))
    check_at_least(args, ("workers",), minimum=0)
    check_seeds(args, ("seed",))
    # The model as built: its group size may belong to the scope it grows into (--expand-scope g-*).
    grows_into_groups = args.expand_scope in GROUPED_SCOPES and args.acdc not in GROUPED_SCOPES
    cli_rules = {"style": "cli"}
    check_acdc_options(
        args.acdc,
        args.atoms,
        None if grows_into_groups else args.group_size,
        args.atom_drop,
        args.decompose_stem,
        scope_name="acdc",
        **cli_rules,
    )
    if args.init_from is not None and not Path(args.init_from).is_file():
        raise FileNotFoundError(f"--init-from {args.init_from!r}: no such checkpoint file")
    if args.stem is not None and not args.backbone.startswith("resnet"):
        raise ValueError(f"--stem applies to the ResNet backbones, not --backbone {args.backbone}")
    if (args.expand_scope or args.expand_atoms) and not (args.init_from or args.resume):
        raise ValueError("--expand-scope/--expand-atoms grow a trained model: give --init-from CHECKPOINT")
    if (args.expand_scope or args.expand_atoms) and args.acdc == "none":
        raise ValueError("--expand-scope/--expand-atoms need the ACDC model being grown: give its --acdc and --atoms")
    if args.expand_scope or args.expand_atoms:  # the model it grows into
        check_acdc_options(
            args.expand_scope or args.acdc,
            args.expand_atoms or args.atoms,
            args.group_size,
            args.atom_drop,
            scope_name="expand_scope" if args.expand_scope else "acdc",
            **cli_rules,
        )
    if args.milestones is not None and args.schedule != "multistep":
        raise ValueError(f"--milestones apply to --schedule multistep, not {args.schedule}")
    if args.schedule == "multistep" and args.milestones is None:
        args.milestones = [150, 250]
    check_at_least(args, ("save_every_steps", "stop_at_step"), minimum=0)


def backbone_kwargs(args: argparse.Namespace, channels: int, image_size: int) -> dict[str, Any]:
    """Backbone options: ``--width``, ``--stem`` and ``--backbone-arg``s, plus ``in_channels``/``image_size`` from
    the data if the backbone takes them."""
    from fewshot.backbones import backbone_options, list_backbones

    if args.backbone not in list_backbones():
        raise ValueError(
            f"--backbone {args.backbone!r} is not a registered backbone; valid: {', '.join(list_backbones())}"
        )
    options = backbone_options(args.backbone)
    kwargs = parse_backbone_args(args.backbone_args)
    for key in sorted(set(kwargs) & set(OWN_FLAGS)):
        raise ValueError(f"--backbone-arg {key}=...: give it with {OWN_FLAGS[key]}")
    unknown = sorted(set(kwargs) - set(options))
    if unknown:
        raise ValueError(
            f"--backbone-arg {', '.join(unknown)}: backbone {args.backbone!r} takes "
            f"{', '.join(options) or 'no options'}"
        )
    for flag in ("width", "stem"):
        if getattr(args, flag) is not None:
            if flag not in options:
                raise ValueError(
                    f"--{flag} does not apply to backbone {args.backbone!r} (its options: "
                    f"{', '.join(options) or 'none'})"
                )
            kwargs[flag] = getattr(args, flag)
    if "in_channels" in options:
        kwargs.setdefault("in_channels", channels)
    if "image_size" in options:
        kwargs.setdefault("image_size", image_size)
    return kwargs


def model_specs(args: argparse.Namespace, num_classes: int, kwargs: dict[str, Any]) -> tuple[ModelSpec, ModelSpec]:
    """(spec the model is built with, spec it trains as): they differ after capacity growth."""
    acdc = None if args.acdc == "none" else args.acdc
    built = ModelSpec(
        args.backbone, acdc, args.atoms, args.group_size, num_classes, kwargs, decompose_stem=args.decompose_stem
    ).normalized()
    if not (args.expand_scope or args.expand_atoms):
        return built, built
    grown = ModelSpec(
        args.backbone,
        args.expand_scope or acdc,
        args.expand_atoms or args.atoms,
        args.group_size,
        num_classes,
        kwargs,
        expanded_from={"acdc": acdc, "atoms": args.atoms},
        decompose_stem=args.decompose_stem,
    ).normalized()
    return built, grown


def init_from(model: torch.nn.Module, path: str, spec: ModelSpec) -> list[str]:
    """Load ``--init-from`` weights into ``model`` after checking the architecture; returns notes.

    A checkpoint trained for another number of classes gives its features only (``fc`` stays new).
    """
    ckpt = load_checkpoint(path)
    check_model_spec(ckpt.get("meta"), spec, path, ignore=("num_classes",))
    state = ckpt["model"]
    saved_classes = (ckpt.get("meta") or {}).get("num_classes")
    if saved_classes != spec.num_classes:
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        missing = [k for k in model.state_dict() if k not in state]
        if any(not k.startswith("fc.") for k in missing):
            raise ValueError(f"checkpoint {path!r} lacks weights besides the classifier: {missing[:5]}")
        model.load_state_dict(state, strict=False)
        return [
            f"--init-from {path}: {saved_classes} classes there, {spec.num_classes} here: classifier (fc) starts new"
        ]
    load_model_state(model, state, source=f"checkpoint {path!r}")
    return []


def default_out(args: argparse.Namespace) -> str:
    acdc = "none" if args.acdc == "none" else f"acdc-{args.acdc}-m{args.atoms}"
    if args.expand_scope or args.expand_atoms:
        acdc += f"_to-{args.expand_scope or args.acdc}-m{args.expand_atoms or args.atoms}"
    return str(Path("runs") / "pretrain" / f"{args.dataset}_{args.backbone}_{acdc}")


def loop_config(args: argparse.Namespace):
    """``fit``'s LoopConfig from the flags."""
    from fewshot.training.supervised import LoopConfig

    return LoopConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        eval_batch_size=args.eval_batch_size,
        workers=args.workers,
        amp=args.amp,
        memory_format=MEMORY_FORMATS[args.memory_format],
        compile=args.compile,
        sync_batchnorm=args.sync_batchnorm,
        seed=args.seed,
        label_smoothing=args.label_smoothing,
        eval_every=args.eval_every,
        save_every_steps=args.save_every_steps,
        stop_at_step=args.stop_at_step or None,
        progress=not args.no_progress,
    )


def optim_config(args: argparse.Namespace):
    """``fit``'s OptimConfig from the flags."""
    from fewshot.training.optim import OptimConfig

    return OptimConfig(
        optimizer=args.optimizer,
        lr=args.lr,
        momentum=args.momentum,
        weight_decay=args.weight_decay,
        nesterov=args.nesterov,
        schedule=args.schedule,
        milestones=tuple(args.milestones or ()),
        gamma=args.gamma,
        step_size=args.step_size,
    )


def prepare_model(args: argparse.Namespace, data, out: Path) -> tuple[torch.nn.Module, ModelSpec, list[str]]:
    """The model to train, its ``ModelSpec`` and notes for the user; checks ``--out`` (nothing is written)."""
    from fewshot.training.models import build_model, expand_model

    kwargs = backbone_kwargs(args, data.channels, data.image_size)
    built, spec = model_specs(args, data.num_classes, kwargs)
    torch.manual_seed(args.seed)
    model = build_model(built, atom_drop=args.atom_drop)
    check_out_folder(out, args.resume, out / LAST, out / RESULT)
    if args.init_from and args.resume:
        notes = [f"--init-from {args.init_from} is not loaded: --resume ({out / LAST}) restores every weight"]
    else:
        notes = init_from(model, args.init_from, built) if args.init_from else []
    if spec is not built:
        model = expand_model(model, spec.acdc, spec.atoms)
    return model, spec, notes


def results_record(
    args: argparse.Namespace, data, spec: ModelSpec, model, info, final: dict[str, Any]
) -> dict[str, Any]:
    """``result.json``: the run's data, model and settings, then ``fit``'s metrics."""
    from fewshot.acdc import count_parameters

    return {
        "dataset": data.name,
        "backbone": spec.backbone,
        "acdc": spec.acdc or "none",
        "atoms": spec.atoms,
        "group_size": spec.group_size,
        "backbone_kwargs": spec.kwargs,
        "expanded_from": spec.expanded_from,
        "num_classes": data.num_classes,
        "train_images": len(data.train),
        "val_images": 0 if data.val is None else len(data.val),
        "image_size": data.image_size,
        "parameters": count_parameters(model),
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "world_size": info.world_size,
        "device": str(info.device),
        "amp": args.amp,
        "seed": args.seed,
        **final,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Everything after parsing; returns the results dict (also written by rank 0)."""
    from fewshot.data.classification import load_classification_data
    from fewshot.training.distributed import cleanup_distributed, setup_distributed
    from fewshot.training.supervised import fit

    check_args(args)
    started = time.perf_counter()
    info = setup_distributed(args.device)
    try:
        args.memory_format = resolved_memory_format(args.memory_format, info.device)
        augment = args.augment == "standard"
        data = load_classification_data(
            args.dataset, args.data_root, image_size=args.image_size, augment=augment, holdout=args.holdout
        )
        out = Path(args.out or default_out(args))
        args.out = str(out)
        model, spec, notes = prepare_model(args, data, out)
        config = {k: to_yaml_value(v) for k, v in vars(args).items() if k != "config"}
        if info.is_main:
            save_config(args, out / CONFIG)
            for note in notes:
                print(f"note: {note}", file=sys.stderr)
        resume = out / LAST if args.resume else None
        final = fit(
            model,
            data,
            optim_config(args),
            loop_config(args),
            info=info,
            run_dir=out,
            meta=spec,
            resume=resume,
            extra={"config": config},
        )
        results = {
            **results_record(args, data, spec, model, info, final),
            "wall_seconds": time.perf_counter() - started,
        }
        if info.is_main:
            write_json(out / RESULT, results)
        return results
    finally:
        cleanup_distributed()


@cli_main
def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Entry point of ``run_pretrain.py``."""
    return run(parse_args_with_config(build_parser(), argv))


def pretrain_main() -> None:
    """Console script ``fewshot-pretrain``: the same as ``python run_pretrain.py``."""
    main()
