"""Classifier metrics over a data loader: loss, top-1 and top-5, summed across DDP ranks."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fewshot.data.classification import Normalizer
from fewshot.modes import eval_mode
from fewshot.training.distributed import DistInfo, all_reduce_sum
from fewshot.training.optim import Precision

__all__ = ["evaluate_classifier", "topk_correct"]


def topk_correct(logits: Tensor, targets: Tensor, ks: Sequence[int] = (1, 5)) -> list[Tensor]:
    """Number of samples whose target is among the top-k logits, for each k (capped at the class count)."""
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices
    hits = top.eq(targets.view(-1, 1))
    return [hits[:, : min(k, kmax)].any(dim=1).sum() for k in ks]


@torch.no_grad()
def evaluate_classifier(
    model: nn.Module, loader: Iterable, normalize: Normalizer, precision: Precision, info: DistInfo = DistInfo()
) -> dict[str, float]:
    """Mean loss, top-1 and top-5 accuracy (fractions) over ``loader``, combined over DDP ranks."""
    device = normalize.device
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # loss, top1, top5 (summed on the device)
    count = 0
    with eval_mode(model):
        for images, targets in loader:
            x = normalize(images)
            y = targets.to(device, non_blocking=True)
            with precision.autocast():
                logits = model(x)
            top1, top5 = topk_correct(logits.float(), y)
            sums += torch.stack(
                [F.cross_entropy(logits.float(), y, reduction="sum").double(), top1.double(), top5.double()]
            )
            count += y.numel()
    sums = all_reduce_sum(torch.cat([sums, sums.new_tensor([float(count)])]), info)
    count = max(sums[3].item(), 1.0)
    return {
        "loss": sums[0].item() / count,
        "top1": sums[1].item() / count,
        "top5": sums[2].item() / count,
        "images": int(sums[3].item()),
    }
