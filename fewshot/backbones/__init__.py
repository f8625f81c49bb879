"""Backbones by name (``create_backbone``, ``list_backbones``), dense or converted to ACDC.

Few-shot: ``conv4``, ``resnet10``, ``resnet18``, ``resnet34``. Classification: ``resnet18_cifar``,
``vgg16_cifar``, ``wrn`` (any depth / widen_factor), ``wrn40_4``, ``wrn40_1``, ``wrn28_10``,
``resnet18_imagenet``, ``resnet34_imagenet``, ``resnet50_imagenet``.
"""

from fewshot.backbones.base import Backbone
from fewshot.backbones.registry import backbone_options, create_backbone, list_backbones, register_backbone

# Importing the modules registers their backbones.
from fewshot.backbones import conv4, resnet, vgg, wrn  # noqa: E402,F401  isort: skip

__all__ = ["Backbone", "backbone_options", "create_backbone", "list_backbones", "register_backbone"]
