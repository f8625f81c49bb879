"""Our backbones and datasets inside other meta-learning libraries.

- ``fewshot.interop.l2l``: learn2learn (``MetaSGD`` that keeps shared ACDC tensors shared,
  ``meta_dataset`` / ``labels_to_indices`` for ``l2l.data.MetaDataset``). Needs learn2learn, which
  ``python scripts/install_learn2learn.py`` installs on Python 3.11+.

Our backbones need no adapter for ``l2l.algorithms.MAML``, ``GBML`` or ANIL-style head-only adaptation,
nor for ``higher``: README.md shows each.
"""
