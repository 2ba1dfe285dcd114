"""Reading the files a user hands in (checkpoints, JSON reports, arrays), with one-line errors.

Each reader turns what the parsing library raises on a missing, empty, damaged
or foreign file into a :class:`~pipeline.errors.DataError` that names the file,
says what was expected and what was found, and gives a hint. The library's own
text is kept short and never repeated when it gives unsafe advice (torch
suggests ``weights_only=False`` for any file it cannot read safely: layerscope
never loads pickles, so that advice is dropped).
"""

from __future__ import annotations

import json
import pickle
import zipfile
from pathlib import Path

from pipeline.errors import DataError


def check_readable_file(path, what: str, hint: str) -> Path:
    """``path`` as a Path, or a DataError if it is missing or not a regular file.

    Parameters
    ----------
    path : path-like
    what : str
        What the file is, capitalised for the message: ``"Checkpoint"``, ``"Metrics file"``.
    hint : str
        How to make the file (for a missing one), e.g. "run `layerscope train`".
    """
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{what} '{path}' is a directory; expected a file. Hint: {hint}")
    if not path.exists():
        raise DataError(f"{what} '{path}' does not exist. Hint: {hint}")
    if path.stat().st_size == 0:
        raise DataError(f"{what} '{path}' is empty (0 bytes). Hint: {hint}")
    return path


def load_torch(path, what: str, hint: str):
    """``torch.load(path, weights_only=True)`` on CPU, with one-line errors.

    Raises
    ------
    DataError
        Missing, empty, truncated, not a PyTorch file, or holding objects that
        are not plain tensors and containers (a pickle layerscope will not run).
    """
    import torch

    path = check_readable_file(path, what, hint)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        reason = "it holds Python objects beyond tensors and plain containers, or is not a PyTorch file"
    except (RuntimeError, EOFError, ValueError, zipfile.BadZipFile, OSError) as exc:
        reason = f"it is truncated or not a PyTorch file ({type(exc).__name__})"
    raise DataError(f"{what} '{path}' cannot be read: {reason}. layerscope loads only weights (torch.load with "
                    f"weights_only=True). Hint: {hint}")


def load_json(path, what: str, hint: str, *, expect=dict):
    """Parse a JSON file whose top level must be ``expect`` (a dict by default), with one-line errors."""
    path = check_readable_file(path, what, hint)
    try:
        content = json.loads(path.read_bytes())
    except UnicodeDecodeError:
        raise DataError(f"{what} '{path}' is not JSON (it is not even text). Hint: {hint}") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{what} '{path}' is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}). "
                        f"Hint: {hint}") from None
    if not isinstance(content, expect):
        raise DataError(f"{what} '{path}' holds a JSON {type(content).__name__}; expected a JSON "
                        f"{'object' if expect is dict else expect.__name__}. Hint: {hint}")
    return content


def require_keys(content: dict, keys, path, what: str, hint: str):
    """Raise a DataError naming the first of ``keys`` missing from ``content`` (a parsed JSON object)."""
    missing = [key for key in keys if key not in content]
    if missing:
        raise DataError(f"{what} '{path}' has no '{missing[0]}' entry: it is not a file layerscope wrote (it has "
                        f"{sorted(content)[:8]}). Hint: {hint}")
    return content


def load_npy(path, what: str, hint: str):
    """``np.load(path, allow_pickle=False)`` of a ``.npy`` file: numbers only, with one-line errors."""
    import numpy as np

    path = check_readable_file(path, what, hint)
    with open(path, "rb") as fh:
        if fh.read(6) != b"\x93NUMPY":
            raise DataError(f"{what} '{path}' is not a NumPy .npy file (no .npy header). Hint: {hint}")
    try:
        array = np.load(path, allow_pickle=False)
    except ValueError:  # the header says dtype=object: loading it would unpickle
        raise DataError(f"{what} '{path}' cannot be read: it holds Python objects (dtype=object), not numbers. "
                        f"Hint: {hint}") from None
    except (OSError, EOFError) as exc:
        raise DataError(f"{what} '{path}' cannot be read: it is truncated or not a NumPy .npy file "
                        f"({type(exc).__name__}). Hint: {hint}") from None
    if not isinstance(array, np.ndarray) or array.dtype.kind not in "biuf":
        kind = type(array).__name__ if not isinstance(array, np.ndarray) else f"dtype {array.dtype}"
        raise DataError(f"{what} '{path}' holds {kind}; expected an array of numbers. Hint: {hint}")
    return array


def what_is_at(path, marker: str) -> str:
    """What a path holds, for a message about a directory artifact that lacks its ``marker`` file.

    Returns one of "does not exist", "is a file, not a directory", "is an empty
    directory", or "has no <marker>" (a directory of something else, or a
    build that was interrupted).
    """
    path = Path(path)
    if not path.exists():
        return "does not exist"
    if not path.is_dir():
        return "is a file, not a directory"
    if not any(path.iterdir()):
        return "is an empty directory"
    return f"has no {marker}"
