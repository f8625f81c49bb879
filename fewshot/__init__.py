"""acdc-fewshot: few-shot meta-learning with ACDC (shared atom-coefficient) convolution backbones."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["create_backbone", "list_backbones", "__version__"]


def __getattr__(name: str) -> Any:
    # Imported on first use so that `import fewshot.data` does not build the model registry.
    if name in ("create_backbone", "list_backbones"):
        from fewshot import backbones

        return getattr(backbones, name)
    raise AttributeError(f"module 'fewshot' has no attribute {name!r}")
