"""What a user's own model comes with, checked before any work: its input specs, the samples to verify on,
its labels, and where in the repository it goes. No torch here: ``normserve import`` uses it too.

An input spec is ``NAME:DATATYPE:DIMS``, one sample's dimensions without the batch axis::

    input:FP32:3,224,224      token_ids:INT64:128      attention_mask:BOOL:128

Samples are an ``.npz`` with one array per input name, batch axis first, and optionally ``labels``
(one class index per row) to check accuracy on. Without them the exporter draws synthetic samples from
the specs and says so: parity on synthetic data proves the fold is exact for inputs like those, not
that the model behaves on the data it will serve (a BatchNorm folded with wrong statistics agrees with
itself on any input; only real samples and labels show the statistics are the right ones).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from export.verify import Feeds
from repository import DTYPES, NAME_PATTERN, RepositoryError, TensorSpec, list_versions

__all__ = [
    "LABELS_KEY",
    "SYNTHETIC_SAMPLES",
    "InputSpec",
    "UserModelError",
    "check_labels",
    "describe_specs",
    "load_samples",
    "read_labels",
    "synthetic_samples",
    "target_version",
]

LABELS_KEY = "labels"  # the samples file's optional array of class indices
SYNTHETIC_SAMPLES = 64
SYNTHETIC_INT_HIGH = 10  # integers are drawn from [0, 10): valid ids for any embedding of 10 or more rows


class UserModelError(ValueError):
    """A mistake in what the user gave (a spec, a file, a callable, a name): one line says what and what was
    expected, and nothing is written."""


@dataclass(frozen=True)
class InputSpec:
    name: str
    datatype: str
    dims: tuple[int, ...]  # one sample's, without the batch axis

    @classmethod
    def parse(cls, text: str) -> InputSpec:
        """``NAME:DATATYPE:DIMS``, e.g. ``input:FP32:3,32,32``; ``DIMS`` may be empty for a scalar per row."""
        parts = text.split(":")
        if len(parts) != 3:
            raise UserModelError(f"--input {text!r}: expected NAME:DATATYPE:DIMS, e.g. input:FP32:3,224,224")
        name, datatype, dims = parts
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.:/-]*", name):
            raise UserModelError(f"--input {text!r}: name {name!r} is not a tensor name (letters, digits, _ . -)")
        if datatype.upper() not in DTYPES:
            raise UserModelError(f"--input {text!r}: datatype {datatype!r}; expected one of {', '.join(DTYPES)}")
        try:
            sizes = tuple(int(d) for d in dims.split(",")) if dims else ()
        except ValueError:
            raise UserModelError(
                f"--input {text!r}: dims {dims!r}; expected positive integers joined by commas"
            ) from None
        if any(d < 1 for d in sizes):
            raise UserModelError(f"--input {text!r}: dims {dims!r}; every size must be at least 1")
        return cls(name, datatype.upper(), sizes)

    @property
    def dtype(self) -> np.dtype[Any]:
        return DTYPES[self.datatype]

    def tensor_spec(self) -> TensorSpec:
        return TensorSpec(name=self.name, datatype=self.datatype, shape=[-1, *self.dims])  # type: ignore[arg-type]

    def __str__(self) -> str:
        return f"{self.name}:{self.datatype}:{','.join(map(str, self.dims))}"


def describe_specs(specs: list[InputSpec]) -> str:
    return ", ".join(f"{s.name} {s.datatype} {list(s.dims)}" for s in specs)


def synthetic_samples(specs: list[InputSpec], count: int = SYNTHETIC_SAMPLES, seed: int = 0) -> Feeds:
    """Seeded samples of the declared specs: standard normal floats, integers in [0, 10), and booleans
    that read as masks (True up to a random length of at least one along the last axis, then False)."""
    rng = np.random.default_rng(seed)
    feeds: Feeds = {}
    for spec in specs:
        shape = (count, *spec.dims)
        if spec.dtype.kind == "f":
            feeds[spec.name] = rng.standard_normal(shape).astype(spec.dtype)
        elif spec.dtype.kind in "iu":
            feeds[spec.name] = rng.integers(0, SYNTHETIC_INT_HIGH, shape).astype(spec.dtype)
        elif spec.dims:
            lengths = rng.integers(1, spec.dims[-1] + 1, (count, *spec.dims[:-1], 1))
            feeds[spec.name] = np.arange(spec.dims[-1]) < lengths
        else:
            feeds[spec.name] = np.ones(shape, dtype=np.bool_)
    return feeds


def load_samples(path: Path, specs: list[InputSpec]) -> tuple[Feeds, np.ndarray | None]:
    """The samples file's inputs, checked against the specs, and its labels if it has them.

    Raises:
        UserModelError: the file cannot be read, its names or shapes do not match the specs, an array
            of floats is given for an integer input, the rows differ, or there are fewer than 2.
    """
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError) as e:
        raise UserModelError(
            f"--samples {path}: not a readable .npz ({e}); expected np.savez(FILE, name=array, ...)"
        ) from None
    labels = arrays.pop(LABELS_KEY, None)
    names = [s.name for s in specs]
    if sorted(arrays) != sorted(names):
        raise UserModelError(
            f"--samples {path} holds arrays {sorted(arrays)}; expected one per input: {names}"
            f" (and optionally {LABELS_KEY!r})"
        )
    feeds: Feeds = {}
    for spec in specs:
        array = arrays[spec.name]
        if array.shape[1:] != spec.dims or array.ndim == 0:
            raise UserModelError(
                f"--samples {path}: {spec.name!r} has shape {list(array.shape)}; expected [rows, "
                f"{', '.join(map(str, spec.dims))}] for --input {spec}"
            )
        if not np.can_cast(array.dtype, spec.dtype, casting="same_kind") or (
            spec.dtype.kind in "iub" and array.dtype.kind == "f"
        ):
            raise UserModelError(
                f"--samples {path}: {spec.name!r} holds {array.dtype}; "
                f"expected values of {spec.datatype} ({spec.dtype})"
            )
        feeds[spec.name] = array.astype(spec.dtype)
    counts = {name: len(a) for name, a in feeds.items()}
    if len(set(counts.values())) != 1:
        raise UserModelError(f"--samples {path}: the inputs have different rows {counts}; expected equal")
    rows = next(iter(counts.values()))
    if rows < 2:
        raise UserModelError(f"--samples {path}: {rows} row(s); expected at least 2 (the batch axis must stay dynamic)")
    if labels is not None and (labels.shape != (rows,) or labels.dtype.kind not in "iu"):
        raise UserModelError(
            f"--samples {path}: {LABELS_KEY!r} has shape {list(labels.shape)} of {labels.dtype}; "
            f"expected {rows} integer class indices"
        )
    return feeds, labels


def read_labels(path: Path | None) -> list[str]:
    """Class names, one per line (blank lines at the end ignored), as Triton's label files are."""
    if path is None:
        return []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserModelError(
            f"--labels {path}: not a readable text file ({e}); expected one class name per line"
        ) from None
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines or any(not line.strip() for line in lines):
        raise UserModelError(f"--labels {path}: expected one non-empty class name per line")
    return [line.strip() for line in lines]


def check_labels(labels: list[str], output: TensorSpec) -> None:
    """The label file names every class of the first output, a (rows, classes) score."""
    if labels and (len(output.shape) != 2 or output.shape[1] != len(labels)):
        raise UserModelError(
            f"--labels has {len(labels)} class names, but the first output {output.name!r} has shape {output.shape}; "
            f"expected [-1, {len(labels)}]"
        )


def target_version(repository: Path, name: str, version: int | None, force: bool) -> str:
    """The version folder to write: ``version``, or the next free one.

    Raises:
        UserModelError: the name is not a valid model name, or the model is already in the repository
            and ``force`` is not given (it is then needed to add a version or to replace one).
    """
    if not re.fullmatch(NAME_PATTERN, name):
        raise UserModelError(f"--name {name!r}: expected letters, digits, '_', '.', '-' (a folder and URL segment)")
    if version is not None and version < 1:
        raise UserModelError(f"--version {version}: expected a positive integer")
    try:
        existing = list_versions(repository / name)
    except RepositoryError:
        existing = []
    if existing and not force:
        nxt = int(existing[-1]) + 1
        raise UserModelError(
            f"model {name!r} is already in {repository} (version(s) {', '.join(existing)}); pass --force to add "
            f"version {version or nxt}{' (replacing it)' if version and str(version) in existing else ''}, "
            "or choose another --name"
        )
    if version is not None:
        return str(version)
    return str(int(existing[-1]) + 1) if existing else "1"
