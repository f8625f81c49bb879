"""The one command line of the few-shot runs: ``run_maml.py`` and ``run_fewshot.py`` both use it.

Parse (flags + ``--config FILE.yaml``), check everything that can be checked before anything is written,
build data, backbone and learner, meta-train (unless ``--eval-only``), evaluate on seeded test episodes
and write ``result.json`` next to the saved config and checkpoints.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from fewshot.acdc.rules import check_acdc_options
from fewshot.backbones import list_backbones
from fewshot.cli.common import (
    MEMORY_FORMATS,
    OneLineParser,
    add_backbone_options,
    add_memory_format_option,
    add_run_options,
    check_at_least,
    check_number,
    check_out_folder,
    check_out_is_folder,
    check_seeds,
    resolved_memory_format,
)
from fewshot.config import cli_main, parse_args_with_config, save_config
from fewshot.data import list_datasets
from fewshot.data.factory import dataset_entry
from fewshot.evaluation import evaluate, result_record
from fewshot.io import write_json
from fewshot.learners.maml import ATOM_DROP_MODES, VECTORIZE_MODES
from fewshot.training.budget import check_seconds, check_train_seconds
from fewshot.training.distributed import resolve_device
from fewshot.training.episodic import LR_SCHEDULES
from fewshot.training.run_folder import BEST, CONFIG, EVAL_CONFIG, EVAL_RESULT, LAST, RESULT

# Choices from the registries: the backbones registered with fewshot=True, the datasets of create_dataset.
FEWSHOT_BACKBONES = tuple(list_backbones(fewshot=True))
DATASETS = tuple(list_datasets(few_shot=True))
# Options that only some methods take: a user giving one to another method gets an error.
# Each maps the CLI option to the learner's keyword (None: a training option, not the learner's).
METHOD_OPTIONS: dict[str, dict[str, str | None]] = {
    "maml": {
        "inner_steps": "inner_steps",
        "inner_lr": "inner_lr",
        "test_inner_steps": "test_inner_steps",
        "test_inner_lr": "test_inner_lr",
        "first_order": "first_order",
        "adapt": "adapt",
        "learn_inner_lr": "learn_inner_lr",
        "bn_mode": "bn_mode",
        "vectorize": "vectorize",
        "inner_atom_drop": "inner_atom_drop",
    },
    "matchingnet": {"fce": "fce", "fce_steps": "fce_steps"},
    "relationnet": {"relation_loss": "loss"},
    "baseline": {"pretrain_epochs": None, "pretrain_batch": None, "head_epochs": "head_epochs"},
    "baseline_pp": {"pretrain_epochs": None, "pretrain_batch": None, "head_epochs": "head_epochs"},
}
# Run settings (not user options of the method) that a learner needs to build itself: RelationNet sizes its
# relation module to the backbone's feature map, which depends on the image size.
LEARNER_RUN_SETTINGS: dict[str, tuple[str, ...]] = {"relationnet": ("image_size",)}
# MAML's test-time options follow the training ones unless given (resolve).
FOLLOWS = {"test_inner_steps": "inner_steps", "test_inner_lr": "inner_lr"}
# Defaults of the Baselines' training on the base classes (Chen et al.: 400 epochs of batch 16), options of the
# run rather than of the learner. Every other method option defaults to its learner's keyword default.
BASE_CLASS_TRAINING_DEFAULTS: dict[str, Any] = {"pretrain_epochs": 400, "pretrain_batch": 16}


def method_defaults(method: str) -> dict[str, Any]:
    """The defaults of ``method``'s own options: its learner's keyword defaults (read from its signature,
    so the learner is the one home of each value), and base-class training's for the Baselines."""
    import inspect

    from fewshot.learners import learner_class

    signature = inspect.signature(learner_class(method)).parameters
    defaults = {}
    for name, keyword in METHOD_OPTIONS.get(method, {}).items():
        if name in FOLLOWS:
            continue
        if keyword is None:
            defaults[name] = BASE_CLASS_TRAINING_DEFAULTS[name]
        elif signature[keyword].default is not inspect.Parameter.empty:
            defaults[name] = signature[keyword].default
    return defaults


# Options of episodic training, with their defaults; learners trained otherwise (Baseline, Baseline++:
# supervised on the base classes) refuse them. meta_batch's default depends on the method (resolve).
# --train-seconds is not among them: it bounds both kinds of training.
EPISODIC_TRAINING_DEFAULTS: dict[str, Any] = {
    "queries": 16,
    "train_episodes": 60000,
    "meta_batch": None,
    "val_every": 500,
    "val_episodes": 100,
    "lr_schedule": "constant",
    "train_ways": None,
    "job_seconds": None,
}


def build_parser(method: str | None = None) -> argparse.ArgumentParser:
    """The parser; with ``method`` fixed (``run_maml.py``) there is no ``--method`` flag."""
    prog = "run_maml.py" if method == "maml" else "run_fewshot.py"
    p = OneLineParser(prog=prog, description=__doc__.splitlines()[0])
    if method is None:
        from fewshot.learners import list_learners

        p.add_argument("--method", required=True, choices=list_learners())
    else:  # fixed; accepted (with that one value) so that a run's saved config.yaml reloads
        p.add_argument("--method", choices=(method,), default=method, help=argparse.SUPPRESS)
    _add_data_options(p)
    add_backbone_options(p, FEWSHOT_BACKBONES, default="resnet10")
    _add_episode_options(p)
    _add_training_options(p)
    _add_maml_options(p)
    _add_other_method_options(p)
    _add_evaluation_options(p)
    run = add_run_options(p, default_out="runs/<dataset>_<method>_<backbone>_<acdc>_<ways>w<shots>s")
    add_memory_format_option(run)
    return p


def _add_data_options(p: argparse.ArgumentParser) -> None:
    """--dataset, --data-root, --image-size, --workers."""
    data = p.add_argument_group("data")
    data.add_argument("--dataset", choices=DATASETS, default="miniimagenet")
    data.add_argument(
        "--data-root",
        default=None,
        help="miniimagenet: its folder (see data/miniimagenet/README.md); glyphs: where the rendered glyphs are "
        "cached (default $FEWSHOT_CACHE or ~/.cache/fewshot)",
    )
    data.add_argument("--image-size", type=int, default=None, help="default: 84 miniimagenet, 28 glyphs")
    data.add_argument("--workers", type=int, default=0, help="DataLoader workers producing episodes")


def _add_episode_options(p: argparse.ArgumentParser) -> None:
    """--ways, --shots, --train-ways, --queries, --test-queries."""
    episodes = p.add_argument_group("episodes")
    episodes.add_argument("--ways", type=int, default=5)
    episodes.add_argument("--shots", type=int, default=1)
    episodes.add_argument(
        "--train-ways",
        type=int,
        default=None,
        help="classes per training episode (default --ways); ProtoNet, MatchingNet and "
        "RelationNet may train on more ways than they are tested on (Snell et al. "
        "2017); validation and test episodes always have --ways",
    )
    episodes.add_argument("--queries", type=int, default=None, help="query images per class in episodic training (16)")
    episodes.add_argument("--test-queries", type=int, default=15)


def _add_training_options(p: argparse.ArgumentParser) -> None:
    """Episodic training and its budget (--train-episodes, --lr, --train-seconds, ...)."""
    train = p.add_argument_group("training")
    train.add_argument(
        "--train-episodes",
        type=int,
        default=None,
        help="episodic training: episodes in all, meta-batch × meta-steps (60000)",
    )
    train.add_argument(
        "--meta-batch",
        type=int,
        default=None,
        help="episodic training: episodes per meta-update (4 for maml, 1 for the others)",
    )
    train.add_argument("--lr", type=float, default=1e-3, help="outer (Adam) learning rate")
    train.add_argument(
        "--train-seconds",
        type=float,
        default=None,
        help="also stop training after the meta-step (episodic) or batch (baseline, "
        "baseline_pp: --pretrain-epochs is then the upper bound) that passes this many "
        "seconds of training, validation included; then test as usual",
    )
    train.add_argument(
        "--job-seconds",
        type=float,
        default=None,
        help="episodic training: a budget for the whole command (data, training, validation, test); "
        "after every meta-step training goes on only while another step, its validation and the test "
        "still fit, the evaluation priced per episode from the latest validation (needs --val-every > 0)",
    )
    train.add_argument(
        "--lr-schedule",
        choices=LR_SCHEDULES,
        default=None,
        help="episodic training: outer learning rate constant (default) or cosine-annealed "
        "to 0 over the budget (meta-steps, or --train-seconds where that ends first)",
    )
    train.add_argument(
        "--val-every", type=int, default=None, help="episodic training: meta-steps between validations (500; 0: none)"
    )
    train.add_argument("--val-episodes", type=int, default=None, help="episodic training: validation episodes (100)")


def _add_maml_options(p: argparse.ArgumentParser) -> None:
    """The options of MAML only."""
    maml = p.add_argument_group("MAML")
    maml.add_argument("--inner-steps", type=int, default=None, help="inner SGD steps in training (5)")
    maml.add_argument("--inner-lr", type=float, default=None, help="inner step size in training (0.01)")
    maml.add_argument("--test-inner-steps", type=int, default=None, help="default: --inner-steps")
    maml.add_argument("--test-inner-lr", type=float, default=None, help="default: --inner-lr")
    maml.add_argument("--first-order", action="store_true", default=None)
    maml.add_argument(
        "--adapt", default=None, help="all (default), atoms, coefficients, head, or a regular expression on names"
    )
    maml.add_argument(
        "--learn-inner-lr",
        action="store_true",
        default=None,
        help="learn a step size per tensor and step (Meta-SGD / MAML++)",
    )
    maml.add_argument("--bn-mode", choices=("transductive", "support"), default=None)
    maml.add_argument(
        "--inner-atom-drop",
        choices=ATOM_DROP_MODES,
        default=None,
        help="ACDC atom-drop in meta-training: step (a new mask at every inner step and at "
        "the query pass; default), task (one mask per task for all of them), query "
        "(none on the support steps, a mask at the query pass)",
    )
    maml.add_argument(
        "--vectorize",
        choices=VECTORIZE_MODES,
        default=None,
        help="episodes through one torch.func.vmap: off (default: one after the other), eval (the "
        "--eval-batch episodes of validation and test; faster on a CPU for the main job's narrow ACDC "
        "network), all (also the tasks of a meta-batch)",
    )


def _add_other_method_options(p: argparse.ArgumentParser) -> None:
    """The options of MatchingNet, RelationNet and the Baselines."""
    other = p.add_argument_group("MatchingNet, RelationNet, Baseline/Baseline++")
    other.add_argument(
        "--fce",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="matchingnet: full-context embeddings (default on)",
    )
    other.add_argument("--fce-steps", type=int, default=None, help="matchingnet: attention-LSTM steps")
    other.add_argument("--relation-loss", choices=("mse", "softmax"), default=None, help="relationnet loss")
    other.add_argument(
        "--pretrain-epochs",
        type=int,
        default=None,
        help="baseline(_pp): epochs of supervised training on the base classes (400)",
    )
    other.add_argument("--pretrain-batch", type=int, default=None, help="baseline(_pp): batch size (16)")
    other.add_argument(
        "--head-epochs", type=int, default=None, help="baseline(_pp): epochs of the new head on each support set (100)"
    )


def _add_evaluation_options(p: argparse.ArgumentParser) -> None:
    """The seeded test episodes and --eval-only."""
    ev = p.add_argument_group("evaluation")
    ev.add_argument("--test-episodes", type=int, default=3000)
    ev.add_argument("--test-seed", type=int, default=0, help="seed of the test episodes (same for every run)")
    ev.add_argument(
        "--test-split",
        choices=("test", "val"),
        default="test",
        help="the split of the final evaluation: test, or val for tuning (the test split is "
        "for final runs; validation during training always uses val)",
    )
    ev.add_argument(
        "--eval-batch",
        type=int,
        default=8,
        help="test episodes predicted together (MAML with --vectorize eval or all: one vmap). The same "
        "computation at every value; only float32 rounding differs when vectorized (the episodes' convs "
        "run as one grouped conv), which can flip a near-tie query (benchmarks/evaluate.py: 99 of 3,000 "
        "episodes differ from one at a time; the mean by < 0.01 points); float64 agrees to 1e-10",
    )
    ev.add_argument("--eval-only", action="store_true")
    ev.add_argument("--checkpoint", default=None, help="with --eval-only: the checkpoint to evaluate")


# ------------------------------------------------------------------------------------------------
def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Check the options against each other and fill the method-dependent defaults."""
    if args.ways < 2:
        raise ValueError(f"--ways must be >= 2, got {args.ways}")
    check_at_least(
        args,
        (
            "shots",
            "queries",
            "test_queries",
            "train_episodes",
            "meta_batch",
            "val_episodes",
            "test_episodes",
            "image_size",
            "eval_batch",
            "fce_steps",
            "pretrain_epochs",
            "pretrain_batch",
            "head_epochs",
            "width",
        ),
    )
    check_at_least(args, ("inner_steps", "test_inner_steps", "val_every", "workers"), minimum=0)
    check_seeds(args, ("seed", "test_seed"))
    check_train_seconds(args.train_seconds)
    check_acdc_options(args.acdc, args.atoms, args.group_size, args.atom_drop, scope_name="acdc", style="cli")
    for name in ("lr", "inner_lr", "test_inner_lr"):  # step sizes
        check_number(args, name)
    _resolve_method_options(args)
    _resolve_training_options(args)
    _check_job_seconds(args)
    if args.eval_only and args.checkpoint is None:
        raise ValueError("--eval-only needs --checkpoint PATH (a best.pt or last.pt of an earlier run)")
    if args.checkpoint is not None and not args.eval_only:
        raise ValueError("--checkpoint is read only with --eval-only; to continue training use --resume --out DIR")
    if args.resume and args.out is None:
        raise ValueError("--resume needs --out DIR, the folder of the run to continue")
    if args.dataset == "miniimagenet" and args.data_root is None:
        raise ValueError(
            "--dataset miniimagenet needs --data-root DIR (how to obtain it: "
            "data/miniimagenet/README.md); --dataset glyphs runs with no download"
        )
    if args.image_size is None:
        args.image_size = dataset_entry(args.dataset).image_size
    if args.stem is not None and not args.backbone.startswith("resnet"):
        raise ValueError(f"--stem applies to the ResNet backbones, not --backbone {args.backbone}")
    # a device this machine lacks is refused here; torchrun picks each rank's later
    args.memory_format = resolved_memory_format(args.memory_format, resolve_device(args.device))
    if args.out is None:
        acdc = args.acdc if args.acdc == "none" else f"acdc-{args.acdc}-m{args.atoms}"
        args.out = str(Path("runs") / f"{args.dataset}_{args.method}_{args.backbone}_{acdc}_{args.ways}w{args.shots}s")
    return args


def _check_job_seconds(args: argparse.Namespace) -> None:
    """--job-seconds: a positive number, for a run that trains on episodes, validates while it trains and
    knows its training's length in meta-steps (the budget ends it at a step not known in advance)."""
    if args.job_seconds is None:
        return
    check_seconds(args.job_seconds, "--job-seconds")
    if args.eval_only:
        raise ValueError("--job-seconds does not apply to --eval-only: it stops training, and there is none")
    if args.val_every == 0:
        raise ValueError(
            "--job-seconds needs --val-every > 0: the validation passes during training time the evaluation "
            "that the test will take"
        )
    if args.lr_schedule == "cosine":
        raise ValueError(
            "--job-seconds does not go with --lr-schedule cosine: where the job budget ends training is known "
            "only as it runs; use --train-seconds to anneal over a wall-clock budget"
        )


def _resolve_method_options(args: argparse.Namespace) -> None:
    """Refuse another method's options; fill this method's defaults (``method_defaults``, ``FOLLOWS``)."""
    own = METHOD_OPTIONS.get(args.method, {})
    for options in METHOD_OPTIONS.values():
        for name in options:
            if name not in own and getattr(args, name) is not None:
                users = [m for m, o in METHOD_OPTIONS.items() if name in o]
                raise ValueError(
                    f"--{name.replace('_', '-')} does not apply to --method {args.method} (only to {', '.join(users)})"
                )
    for name, value in method_defaults(args.method).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    for name, source in FOLLOWS.items():
        if name in own and getattr(args, name) is None:
            setattr(args, name, getattr(args, source))


def _resolve_training_options(args: argparse.Namespace) -> None:
    """Fill the episodic-training defaults, or refuse those options for a method not trained on episodes."""
    from fewshot.learners import learner_class

    if learner_class(args.method).training_mode != "episodic":
        given = [name for name in EPISODIC_TRAINING_DEFAULTS if getattr(args, name) is not None]
        if given:
            flags = ", ".join(f"--{name.replace('_', '-')}" for name in given)
            raise ValueError(
                f"{flags} {'does' if len(given) == 1 else 'do'} not apply to --method {args.method}: "
                "it is trained on the base classes in mini-batches, not on episodes "
                "(its training options: --pretrain-epochs, --pretrain-batch, --lr, --train-seconds)"
            )
        return
    for name, default in EPISODIC_TRAINING_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    if args.meta_batch is None:
        args.meta_batch = 4 if args.method == "maml" else 1
    if args.train_ways is None:
        args.train_ways = args.ways
    elif args.train_ways < 2:
        raise ValueError(f"--train-ways must be >= 2, got {args.train_ways}")
    elif args.method == "maml" and args.train_ways != args.ways:
        raise ValueError(
            f"--train-ways {args.train_ways} does not apply to --method maml: its classifier head "
            f"has --ways {args.ways} outputs, so it trains on {args.ways}-way episodes"
        )


# ------------------------------------------------------------------------------------------------
def model_spec(args: argparse.Namespace, in_channels: int):
    """The architecture of the run's backbone, stored in and checked against checkpoints."""
    from fewshot.backbones import backbone_options
    from fewshot.training.checkpoint import ModelSpec

    options = backbone_options(args.backbone)
    kwargs: dict[str, Any] = {"in_channels": in_channels}
    if "stem" in options:
        kwargs["stem"] = args.stem or "imagenet"
    if "image_size" in options:  # built for one image size (conv4, conv4_nopool)
        kwargs["image_size"] = args.image_size
    if args.width is not None:
        kwargs["width"] = args.width
    return ModelSpec(
        backbone=args.backbone,
        acdc=None if args.acdc == "none" else args.acdc,
        atoms=args.atoms,
        group_size=args.group_size,
        kwargs=kwargs,
    )


def learner_options(args: argparse.Namespace) -> dict[str, Any]:
    """The method-specific options of ``create_learner``, plus the run settings a learner is sized by
    (``LEARNER_RUN_SETTINGS``)."""
    options = METHOD_OPTIONS.get(args.method, {})
    chosen = {
        keyword: getattr(args, name)
        for name, keyword in options.items()
        if keyword is not None and getattr(args, name) is not None
    }
    chosen.update({name: getattr(args, name) for name in LEARNER_RUN_SETTINGS.get(args.method, ())})
    return chosen


def build_learner(args: argparse.Namespace, in_channels: int):
    """Backbone (dense or ACDC) wrapped in the chosen learner, on the run's device."""
    from fewshot.backbones import create_backbone
    from fewshot.learners import create_learner

    spec = model_spec(args, in_channels)
    backbone = create_backbone(
        args.backbone,
        acdc=spec.acdc,
        atoms=args.atoms,
        group_size=args.group_size,
        atom_drop=args.atom_drop,
        **spec.kwargs,
    )
    learner = create_learner(args.method, backbone, args.ways, **learner_options(args))
    return learner.to(args.device, memory_format=MEMORY_FORMATS[args.memory_format]), spec


def episode_source(args: argparse.Namespace, split: str, episodes: int, seed: int, train: bool):
    """Seeded episodes of one split (the same seed gives the same episodes for every learner): training
    episodes have ``--train-ways`` classes and ``--queries`` queries, the others ``--ways`` and
    ``--test-queries``."""
    from fewshot.data import EpisodeSampler, build_transform, create_dataset

    try:
        dataset = create_dataset(args.dataset, split, root=args.data_root, image_size=args.image_size)
    except FileNotFoundError as err:
        raise FileNotFoundError(
            f"{str(err).rstrip('.')}. To try the toolkit without any download, use --dataset glyphs"
        ) from None
    transform = build_transform(args.dataset, args.image_size, train=train)
    queries = args.queries if train else args.test_queries
    ways = args.train_ways if train else args.ways
    return EpisodeSampler(dataset, ways, args.shots, queries, episodes, seed, transform=transform)


def pretrain_on_base_classes(learner, args: argparse.Namespace, spec, out: Path, info) -> dict[str, Any]:
    """Baseline / Baseline++ training: supervised on the base (train) classes, Chen et al.'s recipe
    (Adam at --lr, batch 16, 400 epochs, standard augmentation), through the shared supervised loop.

    With --train-seconds the loop stops after the batch that passes the budget (--pretrain-epochs is the
    upper bound). Returns the summary of the result record: epochs completed and planned, steps done and
    planned, ``stopped_by`` (``epochs`` or ``train_seconds``) and the seconds on the budget's clock."""
    from fewshot.data.classification import load_classification_data
    from fewshot.training.optim import OptimConfig
    from fewshot.training.supervised import LoopConfig, fit

    data = load_classification_data(args.dataset, args.data_root, image_size=args.image_size)
    model = learner.pretrain_model(data.num_classes)
    optim = OptimConfig(optimizer="adam", lr=args.lr, weight_decay=0.0, schedule="constant")
    loop = LoopConfig(
        epochs=args.pretrain_epochs,
        batch_size=args.pretrain_batch,
        workers=args.workers,
        memory_format=MEMORY_FORMATS[args.memory_format],
        seed=args.seed,
        train_seconds=args.train_seconds,
        progress=not args.no_progress,
    )
    resume = out / "pretrain" / LAST if args.resume else None
    metrics = fit(
        model,
        data,
        optim,
        loop,
        info=info,
        run_dir=out / "pretrain",
        meta=spec,
        resume=resume,
    )
    return {
        "pretrain_top1": metrics["top1"],
        "pretrain_epochs": metrics["epoch"],
        "pretrain_epochs_planned": args.pretrain_epochs,
        "pretrain_steps": metrics["step"],
        "pretrain_steps_planned": args.pretrain_epochs * metrics["steps_per_epoch"],
        "stopped_by": metrics["stopped_by"],
        "train_seconds": round(metrics["clock_seconds"], 2),
    }


def check_start(args: argparse.Namespace, learner, spec, out: Path, episodic: bool) -> None:
    """Before anything is written: --eval-only loads its checkpoint (which must fit the model); a training
    run needs a new --out, or with --resume the folder of this very run at a step the plan still reaches."""
    from fewshot.training.checkpoint import check_model_spec, load_checkpoint, load_model_state

    if args.eval_only:
        check_out_is_folder(out)
        state = load_checkpoint(args.checkpoint, map_location=args.device)
        check_model_spec(state.get("meta"), spec, args.checkpoint)
        load_model_state(learner, state["model"], source=args.checkpoint)
        return
    resume_point = out / LAST if episodic else out / "pretrain" / LAST
    check_out_folder(out, args.resume, resume_point, out / BEST)
    if not args.resume:
        return
    saved = load_checkpoint(resume_point, map_location="cpu", mmap=True)  # the metadata only: no second full read
    check_model_spec(saved.get("meta"), spec, resume_point)
    done = saved.get("progress", {}).get("step", 0)
    planned = max(1, args.train_episodes // args.meta_batch) if episodic else done
    if done > planned:
        raise ValueError(
            f"--resume: {resume_point} is at meta-step {done}, beyond the {planned} meta-steps of "
            f"--train-episodes {args.train_episodes} (meta-batch {args.meta_batch}); give at least "
            f"--train-episodes {done * args.meta_batch}"
        )


def episodic_training(args: argparse.Namespace) -> tuple[Any, Any, Any]:
    """The training and validation episodes and the schedule of meta-training."""
    from fewshot.training.episodic import EpisodicSchedule

    train_episodes = episode_source(args, "train", args.train_episodes, args.seed, train=True)
    val_episodes = episode_source(args, "val", args.val_episodes, args.test_seed + 1, train=False)
    schedule = EpisodicSchedule(
        meta_steps=max(1, args.train_episodes // args.meta_batch),
        meta_batch=args.meta_batch,
        lr=args.lr,
        val_every=args.val_every,
        num_workers=args.workers,
        eval_batch=args.eval_batch,
        train_seconds=args.train_seconds,
        lr_schedule=args.lr_schedule,
    )
    return train_episodes, val_episodes, schedule


def train(
    args: argparse.Namespace, learner, spec, out: Path, episodic: tuple[Any, Any, Any] | None, info, started: float
) -> dict[str, Any]:
    """Meta-train (``episodic``: episodes and schedule; ``best.pt`` is loaded back) or, for the Baselines,
    train on the base classes; returns the training summary that goes into ``result.json``. Under
    torchrun (``info``) every rank trains, rank 0 writes. ``started``: when the job began (the clock of
    --job-seconds)."""
    from fewshot.training.budget import JobBudget
    from fewshot.training.checkpoint import load_checkpoint, load_model_state, save_checkpoint
    from fewshot.training.episodic import train_episodic

    if episodic is None:
        summary = pretrain_on_base_classes(learner, args, spec, out, info)
        if info.is_main:
            save_checkpoint(out / BEST, model=learner, meta=spec, config=vars(args))
        return summary
    summary = train_episodic(
        learner,
        *episodic,
        out,
        spec=spec,
        config=vars(args),
        device=args.device,
        resume=args.resume,
        progress=not args.no_progress,
        info=info,
        memory_format=MEMORY_FORMATS[args.memory_format],
        job=None if args.job_seconds is None else JobBudget(args.job_seconds, args.test_episodes, started),
    )
    load_model_state(learner, load_checkpoint(out / BEST, map_location=args.device)["model"])
    return summary


def run_metadata(args: argparse.Namespace, learner, started: float) -> dict[str, Any]:
    """What ``result.json`` records about the run besides its accuracies and training summary."""
    return dict(
        dataset=args.dataset,
        method=args.method,
        backbone=args.backbone,
        acdc=args.acdc,
        atoms=args.atoms if args.acdc != "none" else None,
        group_size=args.group_size,
        ways=args.ways,
        shots=args.shots,
        queries=args.test_queries,
        image_size=args.image_size,
        split=args.test_split,
        train_ways=args.train_ways,
        parameters=sum(p.numel() for p in learner.backbone.parameters()),
        seconds=round(time.perf_counter() - started, 1),
        device=args.device,
        memory_format=args.memory_format,
        seed=args.seed,
        test_seed=args.test_seed,
        checkpoint=args.checkpoint,
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Train (unless --eval-only) and evaluate; returns the JSON result that is also written (by rank 0
    under torchrun, where the meta-batches and the test episodes are split across the processes)."""
    from fewshot.training.distributed import cleanup_distributed, setup_distributed

    args = resolve(args)
    started = time.perf_counter()
    info = setup_distributed(args.device)
    try:
        args.device = str(info.device)
        if args.meta_batch and info.world_size > args.meta_batch and not args.eval_only:
            raise ValueError(
                f"--meta-batch {args.meta_batch} is smaller than the {info.world_size} processes of torchrun: "
                "each process needs at least one task per meta-step; raise --meta-batch or lower --nproc_per_node"
            )
        return _run(args, info, started)
    finally:
        cleanup_distributed()


def _run(args: argparse.Namespace, info, started: float) -> dict[str, Any]:
    out = Path(args.out)
    # Everything that can fail on the user's input is checked before anything is written.
    test_episodes = episode_source(args, args.test_split, args.test_episodes, args.test_seed, train=False)
    torch.manual_seed(args.seed)
    learner, spec = build_learner(args, test_episodes.dataset.channels)
    episodic = learner.training_mode == "episodic"
    check_start(args, learner, spec, out, episodic)
    episodes = episodic_training(args) if episodic and not args.eval_only else None

    if info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_config(args, out / (EVAL_CONFIG if args.eval_only else CONFIG))
    summary = {} if args.eval_only else train(args, learner, spec, out, episodes, info, started)
    learner.eval()
    test_started = time.perf_counter()
    result = evaluate(
        learner,
        test_episodes,
        device=args.device,
        progress=not args.no_progress and info.is_main,
        total=args.test_episodes,
        batch=args.eval_batch,
        info=info,
        memory_format=MEMORY_FORMATS[args.memory_format],
    )
    record = result_record(result, **run_metadata(args, learner, started), **summary)
    record["test_seconds"] = round(time.perf_counter() - test_started, 2)
    if info.world_size > 1:
        record["processes"] = info.world_size
    result_path = out / (EVAL_RESULT if args.eval_only else RESULT)
    if info.is_main:
        write_json(result_path, record)
        print(
            f"{args.method} {args.backbone} acdc={args.acdc} {args.dataset} {args.ways}-way {args.shots}-shot: "
            f"{result.mean:.2f}% ± {result.ci95:.2f}% over {result.episodes} test episodes "
            f"({record['seconds']:.0f} s; {result_path})"
        )
    return record


def main(argv: Sequence[str] | None = None, method: str | None = None) -> dict[str, Any]:
    """Entry point of run_maml.py (``method="maml"``) and run_fewshot.py (``--method``)."""

    @cli_main
    def _main() -> dict[str, Any]:
        return run(parse_args_with_config(build_parser(method), argv))

    return _main()


def maml_main() -> None:
    """Console script ``fewshot-maml``: the same as ``python run_maml.py``."""
    main(method="maml")


def fewshot_main() -> None:
    """Console script ``fewshot-run``: the same as ``python run_fewshot.py``."""
    main()
