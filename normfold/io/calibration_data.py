"""Calibration data: batches of model inputs read from `.npz` files, one at a time.

A source is one `.npz` file (one batch) or a folder of them (one batch each,
read in name order). Arrays are matched to the model inputs by name; a model
with a single input takes any single array name. Every file is checked
against the model inputs (names, dtypes, ranks, fixed sizes) from its headers
before any data is read, so a bad file fails at once, not after a long run.
Iterating a source loads one batch at a time and can be repeated.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from normfold.errors import NormfoldError
from normfold.io.inputs import Feeds, InputSpec, check_feeds, read_npz, unreadable_npz

ADVICE = "write each batch with numpy.savez"

NPZ_SUFFIX = ".npz"


class CalibrationData:
    """A re-iterable source of batches ({input name: array}) checked against `specs`.

    `source` is an `.npz` path, a folder of `.npz` files, or a sequence of
    feeds dicts (already in memory, e.g. from Python). `samples` is the total
    number of samples (dimension 0 of the first input, summed over batches)."""

    def __init__(self, source: str | os.PathLike | Sequence[Feeds], specs: list[InputSpec]):
        self.specs = specs
        self._batches: Sequence[Feeds] | None = None
        self.files: list[Path] = []
        if isinstance(source, (str, os.PathLike)):
            self.files = npz_files(Path(source))
            headers = ((str(path), _header_arrays(path)) for path in self.files)
        else:
            if iter(source) is source:
                raise NormfoldError("calibration data must be a path or a list of {input: array} dicts, "
                                    "not a one-shot iterator (it is read once per wave)")
            self._batches = source
            headers = ((f"calibration batch {i}", feeds) for i, feeds in enumerate(source))
        self.samples = sum(samples_in(self._checked(feeds, where), specs) for where, feeds in headers)
        if len(self) == 0:
            raise NormfoldError("calibration data holds no batch; give at least one .npz file")
        if self.samples == 0:
            raise NormfoldError("calibration data holds no samples (every batch is empty)")

    def __len__(self) -> int:
        return len(self.files) if self._batches is None else len(self._batches)

    def __iter__(self) -> Iterator[tuple[str, Feeds]]:
        """(where it came from, feeds) for each batch, loading one at a time."""
        if self._batches is not None:
            for i, feeds in enumerate(self._batches):
                yield f"calibration batch {i}", self._checked(feeds, f"calibration batch {i}")
            return
        for path in self.files:
            yield str(path), self._checked(read_npz(path, ADVICE), str(path))

    def _checked(self, feeds: Feeds, source: str) -> Feeds:
        """`feeds` matched to the model inputs (a single array is renamed to the
        single input's name), or a NormfoldError saying how it does not fit."""
        if len(self.specs) == 1 and len(feeds) == 1:
            feeds = {self.specs[0].name: next(iter(feeds.values()))}
        check_feeds(feeds, self.specs, source)
        return feeds


def samples_in(feeds: Feeds, specs: list[InputSpec]) -> int:
    """Number of samples in a batch: the size of dimension 0 of the first input
    (1 for a scalar input or a model without inputs)."""
    if not specs:
        return 1
    first = feeds[specs[0].name]
    return int(first.shape[0]) if first.ndim else 1


def npz_files(path: Path) -> list[Path]:
    """The batch files of `path`: itself, or the `.npz` files of a folder (in
    name order). Anything else in the folder (but hidden files) is an error."""
    if not path.exists():
        raise NormfoldError(f"{path}: no such file or folder; --data takes an .npz file or a folder of them")
    if path.is_file():
        return [path]
    entries = sorted(p for p in path.iterdir() if not p.name.startswith("."))
    others = [p.name for p in entries if p.suffix != NPZ_SUFFIX or not p.is_file()]
    if others:
        raise NormfoldError(
            f"{path}: holds entries that are not .npz files ({', '.join(others[:5])}"
            f"{', ...' if len(others) > 5 else ''}); keep only the .npz batches in the folder")
    if not entries:
        raise NormfoldError(f"{path}: folder holds no .npz file; write one batch per file with numpy.savez")
    return entries


def _header_arrays(path: Path) -> Feeds:
    """{name: zero-size stand-in with the array's dtype and shape}, read from the
    `.npy` headers inside the `.npz`: no data is loaded."""
    arrays = {}
    try:
        with zipfile.ZipFile(path) as archive:
            for member in archive.infolist():
                name = member.filename.removesuffix(".npy")
                with archive.open(member) as f:
                    version = np.lib.format.read_magic(f)
                    read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                            else np.lib.format.read_array_header_2_0)
                    shape, _, dtype = read(f)
                arrays[name] = np.broadcast_to(np.zeros((), dtype), shape)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise unreadable_npz(path, exc, ADVICE) from exc
    return arrays
