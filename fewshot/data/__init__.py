"""Few-shot datasets, transforms and the episode sampler."""
from fewshot.data.episode import Episode

__all__ = ["Episode"]
