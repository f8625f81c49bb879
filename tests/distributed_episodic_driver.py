"""Run by tests/test_episodic_distributed.py under torchrun (2 CPU processes, gloo): one launch does every
check and rank 0 saves what the test compares with a single process's computation.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/distributed_episodic_driver.py OUT
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fewshot.evaluation import evaluate  # noqa: E402
from fewshot.training.distributed import cleanup_distributed, setup_distributed  # noqa: E402
from fewshot.training.episodic import EpisodicSchedule, backward_meta_batch, train_episodic  # noqa: E402
from tests.distributed_episodic_cases import (  # noqa: E402
    GRADIENT_CASES,
    RESUME_SPEC,
    RESUME_TRAIN,
    RESUME_VAL,
    eval_episodes,
    gradient_case,
    resume_learner,
)


def main(out: Path) -> None:
    info = setup_distributed("cpu")
    saved: dict[str, object] = {}
    for name in GRADIENT_CASES:  # this rank's share of each meta-batch, gradients summed over the ranks
        learner, batch = gradient_case(name)
        learner.zero_grad()
        loss, accuracy = backward_meta_batch(learner, batch[info.rank :: info.world_size], info)
        saved[name] = {
            "loss": loss.item(),
            "accuracy": accuracy,
            "grads": {n: p.grad.clone() for n, p in learner.named_parameters() if p.grad is not None},
        }
    learner, episodes = eval_episodes()
    saved["evaluation"] = evaluate(learner, episodes, progress=False, info=info).accuracies

    schedule = EpisodicSchedule(meta_steps=6, meta_batch=3, val_every=2)  # 3 tasks: 2 on rank 0, 1 on rank 1
    straight = resume_learner()
    train_episodic(straight, RESUME_TRAIN, RESUME_VAL, schedule, out / "a", spec=RESUME_SPEC, progress=False, info=info)
    first_part = EpisodicSchedule(meta_steps=3, meta_batch=3, val_every=2)
    train_episodic(
        resume_learner(), RESUME_TRAIN, RESUME_VAL, first_part, out / "b", spec=RESUME_SPEC, progress=False, info=info
    )
    torch.manual_seed(12345 + info.rank)  # whatever each rank's generator holds now, resuming restores it
    resumed = resume_learner()
    train_episodic(
        resumed, RESUME_TRAIN, RESUME_VAL, schedule, out / "b", spec=RESUME_SPEC, resume=True, progress=False, info=info
    )
    saved["straight"] = straight.state_dict()
    saved["resumed"] = resumed.state_dict()
    if info.is_main:
        torch.save(saved, out / "rank0.pt")
    torch.save(straight.state_dict(), out / f"straight_rank{info.rank}.pt")
    cleanup_distributed()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
