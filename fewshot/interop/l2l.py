"""learn2learn interop: what its algorithms and data utilities need from our side.

- :class:`MetaSGD`: learn2learn's Meta-SGD with an update that moves a tensor used by several modules
  (ACDC's shared coefficients, a tied ``nn.Linear``) once, everywhere it is used. learn2learn 0.2.0's
  own update replaces the tensor in the first module that holds it only: the others keep the unadapted
  one, and from the second step on its learning rates pair with the wrong tensors (a shape error, or a
  silent mismatch when shapes agree).
- :func:`meta_dataset`: one of our datasets as an ``l2l.data.MetaDataset`` whose items are the images our
  episodes use (normalized float tensors, built by the same transform), indexed by class without reading
  every item (learn2learn's default reads the whole dataset once to find the labels).

- :class:`ThreeDimensional`: lets learn2learn's learned gradient transforms (``MetaCurvatureTransform``,
  ``KroneckerTransform``), which know 1-, 2- and 4-D parameters only, take ACDC's 3-D atoms and
  coefficients, for ``l2l.algorithms.GBML``.

Our ACDC parameters get contiguous gradients, so ``l2l.algorithms.GBML`` works on every scope.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

try:
    import learn2learn as l2l
except ImportError as exc:  # learn2learn is not a dependency: say how to get it
    raise ImportError(
        f"fewshot.interop.l2l needs learn2learn ({exc}); it does not pip-install on Python 3.11+ as "
        "published: `python scripts/install_learn2learn.py` installs it"
    ) from exc

__all__ = ["MetaSGD", "meta_sgd_update", "ThreeDimensional", "meta_dataset", "labels_to_indices"]


def meta_sgd_update(model: nn.Module, lrs: Sequence[Tensor], grads: Sequence[Tensor | None]) -> nn.Module:
    """``p <- p - lr * g`` for every parameter of ``model`` (in ``model.parameters()`` order), in place on
    the module tree; a tensor held by several modules becomes the same updated tensor in all of them."""
    params = list(model.parameters())
    if not len(params) == len(lrs) == len(grads):
        raise ValueError(
            f"meta_sgd_update: {len(params)} parameters, {len(lrs)} learning rates and {len(grads)} gradients; "
            "they must pair one to one"
        )
    for param, lr, grad in zip(params, lrs, grads):
        param.update = None if grad is None else -lr * grad
    return l2l.utils.update_module(model)


class MetaSGD(l2l.algorithms.MetaSGD):
    """``l2l.algorithms.MetaSGD`` whose ``clone()``/``adapt()`` keep tied tensors tied (see the module doc).

    Same arguments as learn2learn's: ``MetaSGD(model, lr=1.0, first_order=False, lrs=None)``; one
    learning-rate tensor per distinct parameter, in ``model.parameters()`` order.
    """

    def clone(self) -> MetaSGD:
        return MetaSGD(
            l2l.utils.clone_module(self.module),
            lrs=l2l.utils.clone_parameters(self.lrs),
            first_order=self.first_order,
        )

    def adapt(self, loss: Tensor, first_order: bool | None = None) -> None:
        second_order = not (self.first_order if first_order is None else first_order)
        grads = torch.autograd.grad(
            loss, list(self.module.parameters()), retain_graph=second_order, create_graph=second_order
        )
        self.module = meta_sgd_update(self.module, list(self.lrs), grads)


class ThreeDimensional:
    """Wrap a learn2learn transform factory so that it also takes 3-D parameters.

    ``MetaCurvatureTransform`` and ``KroneckerTransform`` raise on 3-D tensors: ACDC's atoms
    ``(m, kh, kw)`` and coefficients ``(c_out, c_in, m)``. A 3-D parameter ``(a, b, c)`` is handed to the
    factory as ``(a, b, c, 1)``, which both read as a convolution weight with one factor per axis (for
    MetaCurvature: ``a x a``, ``b x b`` and ``c x c`` matrices, identities at first); other shapes pass
    through unchanged::

        gbml = l2l.algorithms.GBML(model, transform=ThreeDimensional(l2l.optim.MetaCurvatureTransform), lr=0.1)
    """

    def __init__(self, transform: Any) -> None:
        self.transform = transform

    def __call__(self, parameter: Tensor) -> nn.Module:
        if parameter.dim() != 3:
            return self.transform(parameter)
        stand_in = parameter.detach().unsqueeze(-1)
        return l2l.optim.transforms.module_transform.ReshapedTransform(self.transform(stand_in), stand_in.shape)


def labels_to_indices(dataset: Any) -> dict[int, list[int]]:
    """``{class index: item indices}`` from the dataset's ``class_indices`` (or ``targets``), for
    ``l2l.data.MetaDataset(dataset, labels_to_indices=...)``: no item is read."""
    groups = getattr(dataset, "class_indices", None)
    if groups is not None:
        return {label: torch.as_tensor(members).tolist() for label, members in enumerate(groups)}
    targets = getattr(dataset, "targets", None)
    if targets is None:
        raise ValueError(
            f"labels_to_indices: {type(dataset).__name__} has neither 'class_indices' nor 'targets' "
            "(the class index of each item)"
        )
    result: dict[int, list[int]] = {}
    for index, label in enumerate(torch.as_tensor(targets).tolist()):
        result.setdefault(int(label), []).append(index)
    return result


def meta_dataset(
    name: str, split: str, *, root: Any = None, image_size: int | None = None, train: bool = False, **options: Any
) -> l2l.data.MetaDataset:
    """Split ``split`` of registry dataset ``name`` as an ``l2l.data.MetaDataset``.

    Items are ``(image, class index)`` with the image transformed as our episodes of that split are
    (``build_transform(name, image_size, train)``: float32, normalized; ``train=True`` adds the training
    augmentation). ``root``, ``image_size`` and ``options`` go to :func:`fewshot.data.create_dataset`.
    """
    from fewshot.data import build_transform, create_dataset
    from fewshot.data.factory import dataset_entry

    size = dataset_entry(name, few_shot=True).image_size if image_size is None else image_size
    transform = build_transform(name, size, train=train)
    dataset = create_dataset(name, split, root=root, image_size=size, transform=transform, **options)
    return l2l.data.MetaDataset(dataset, labels_to_indices=labels_to_indices(dataset))
