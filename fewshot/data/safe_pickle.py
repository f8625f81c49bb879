"""Reading dataset pickles without running code: a ``pickle.Unpickler`` that admits only plain data.

A pickle can name any importable function and call it while loading (``__reduce__``), so loading an
untrusted ``mini-imagenet-cache-*.pkl`` or CIFAR batch with ``pickle.load`` can run arbitrary commands.
Dataset pickles only ever hold dicts, lists, tuples, strings, bytes, numbers, booleans, ``None`` and
numpy arrays / dtypes / scalars. The first five need no global at all; numpy objects need the few
functions in ``ALLOWED_GLOBALS``. Any other global is refused *before* it is imported or called.
"""

from __future__ import annotations

import codecs
import os
import pickle
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

try:  # numpy >= 2
    from numpy._core import multiarray as _multiarray
    from numpy._core import numeric as _numeric
except ImportError:  # numpy 1.x
    from numpy.core import multiarray as _multiarray  # type: ignore[no-redef]
    from numpy.core import numeric as _numeric  # type: ignore[no-redef]


class ForbiddenGlobalError(ValueError):
    """A pickle names a global that plain data never needs (e.g. ``os.system``); nothing was run."""


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    """``_codecs.encode`` as pickles of protocol < 3 use it for bytes: only ever with latin-1."""
    if codecs.lookup(encoding).name != "iso8859-1" or not isinstance(text, str):
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r}: pickles of bytes use latin1")
    return text.encode("latin1")


def _numpy_globals(module: str) -> dict[tuple[str, str], Any]:
    return {
        (f"{module}.multiarray", "_reconstruct"): _multiarray._reconstruct,
        (f"{module}.multiarray", "scalar"): _multiarray.scalar,
        (f"{module}.numeric", "_frombuffer"): _numeric._frombuffer,
    }


# (module, name) -> the object it stands for. numpy 1.x wrote ``numpy.core.*``, numpy 2 writes ``numpy._core.*``;
# both resolve to the installed numpy's functions without importing anything by name.
ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,  # bytes in pickles of protocol 0-2 written by Python 3
    **_numpy_globals("numpy.core"),
    **_numpy_globals("numpy._core"),
}


class DataUnpickler(pickle.Unpickler):
    """An unpickler for dataset files: plain data and numpy arrays only.

    ``source`` (the file name) goes into the error raised for a forbidden global.
    """

    def __init__(self, file: BinaryIO, source: str | os.PathLike[str], *, encoding: str = "ASCII") -> None:
        super().__init__(file, encoding=encoding)
        self.source = str(source)

    def find_class(self, module: str, name: str) -> Any:
        try:
            return ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise ForbiddenGlobalError(
                f"{self.source!r}: refusing to load: it references {module}.{name}, "
                "which a dataset pickle never contains"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are not plain data")


def load_data_pickle(path: str | os.PathLike[str], encoding: str = "ASCII") -> Any:
    """The contents of the pickle file ``path``, read with ``DataUnpickler``.

    ``encoding`` decodes Python 2 ``str`` objects (``"latin1"`` for Python 2 pickles holding numpy arrays).
    Raises ForbiddenGlobalError (a ValueError naming the file) for anything but plain data; other
    errors (truncated or not a pickle) propagate as ``pickle.load`` raises them.
    """
    path = Path(path)
    with open(path, "rb") as f:
        return DataUnpickler(f, path, encoding=encoding).load()
