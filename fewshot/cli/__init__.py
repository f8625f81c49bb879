"""The command lines: ``run_maml.py`` / ``fewshot-maml`` and ``run_fewshot.py`` / ``fewshot-run``
(``fewshot.cli.fewshot``: few-shot training and the seeded test), ``run_pretrain.py`` / ``fewshot-pretrain``
(``fewshot.cli.pretrain``: supervised training on a whole dataset). Options they share mean the same in each
(``fewshot.cli.common``)."""

from fewshot.cli.fewshot import (
    FEWSHOT_BACKBONES,
    build_learner,
    build_parser,
    episode_source,
    fewshot_main,
    main,
    maml_main,
    resolve,
)
from fewshot.cli.pretrain import pretrain_main

__all__ = [
    "FEWSHOT_BACKBONES",
    "build_learner",
    "build_parser",
    "episode_source",
    "fewshot_main",
    "main",
    "maml_main",
    "pretrain_main",
    "resolve",
]
