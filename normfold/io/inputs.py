"""Input data for running a model: what its inputs are, generated feeds, `.npz` feeds.

Generated inputs are deterministic for a given seed and follow the input's
dtype: floating point inputs are standard normal, integer inputs are uniform
in [0, 10) (uint8 in [0, 256)), bool inputs are fair coin flips. Dynamic
dimensions have no size of their own; `--shape NAME=1x3x224x224` gives it.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from normfold.errors import NormfoldError

Feeds = dict[str, np.ndarray]  # one sample: input name -> array
Dim = int | str | None  # a fixed size, a symbolic name, or unknown

INT_HIGH = 10  # integer inputs are drawn from [0, INT_HIGH) (uint8: [0, 256))


@dataclass(frozen=True)
class InputSpec:
    """One graph input: its name, numpy dtype and dimensions as declared."""

    name: str
    dtype: np.dtype
    dims: tuple[Dim, ...]

    def describe(self) -> str:
        """E.g. `x: float32[batch,3,224,224]`."""
        dims = ",".join("?" if d is None else str(d) for d in self.dims)
        return f"{self.name}: {self.dtype}[{dims}]"


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    """The real inputs of `model` (graph inputs that are not initializers), in order."""
    initializers = {init.name for init in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor_type = value.type.tensor_type
        if not value.type.HasField("tensor_type"):
            raise NormfoldError(f"input '{value.name}' is not a tensor; only tensor inputs are supported")
        try:
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
        except (KeyError, TypeError) as exc:
            raise NormfoldError(
                f"input '{value.name}' has an element type normfold cannot generate "
                f"({onnx.TensorProto.DataType.Name(tensor_type.elem_type)})"
            ) from exc
        dims: list[Dim] = []
        for dim in tensor_type.shape.dim:
            if dim.HasField("dim_value"):
                dims.append(dim.dim_value)
            else:
                dims.append(dim.dim_param or None)
        specs.append(InputSpec(value.name, dtype, tuple(dims)))
    return specs


def parse_shape(text: str) -> tuple[int, ...]:
    """`"1x3x224x224"` -> (1, 3, 224, 224); a scalar is `""` or `"scalar"`."""
    text = text.strip()
    if text in ("", "scalar"):
        return ()
    parts = text.lower().replace(",", "x").split("x")
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        raise NormfoldError(f"shape '{text}' is not of the form 1x3x224x224 (sizes separated by 'x')") from None
    if any(d < 0 for d in dims):
        raise NormfoldError(f"shape '{text}' has a negative size")
    return dims


def parse_named_shapes(values: tuple[str, ...] | list[str], names: list[str]) -> dict[str, tuple[int, ...]]:
    """Parse repeated `NAME=1x3x224x224` options into {name: shape}.

    A bare shape (no `NAME=`) is accepted when there is exactly one input in
    `names`. Unknown names are an error that lists the known ones.
    """
    shapes: dict[str, tuple[int, ...]] = {}
    for value in values:
        name, sep, shape = value.rpartition("=")
        if not sep:
            if len(names) != 1:
                raise NormfoldError(
                    f"shape '{value}' has no input name and there are {len(names)} inputs "
                    f"({', '.join(names)}); write it as NAME=SHAPE"
                )
            name = names[0]
        if name not in names:
            raise NormfoldError(f"shape given for '{name}', which is not an input; inputs: {', '.join(names)}")
        if name in shapes:
            raise NormfoldError(f"shape of input '{name}' given twice")
        shapes[name] = parse_shape(shape)
    return shapes


def resolve_shape(spec: InputSpec, given: tuple[int, ...] | None) -> tuple[int, ...]:
    """The concrete shape for `spec`: `given` (checked against the fixed sizes),
    or the declared shape when it has no dynamic dimension."""
    if given is not None:
        if len(given) != len(spec.dims):
            raise NormfoldError(
                f"--shape for input '{spec.name}' has {len(given)} dimensions but the model declares "
                f"{len(spec.dims)} ({spec.describe()})"
            )
        for axis, (want, got) in enumerate(zip(spec.dims, given)):
            if isinstance(want, int) and want != got:
                raise NormfoldError(
                    f"--shape for input '{spec.name}': dimension {axis} is fixed to {want} in the model, "
                    f"not {got} ({spec.describe()})"
                )
        return tuple(given)
    for axis, dim in enumerate(spec.dims):
        if not isinstance(dim, int):
            label = f"'{dim}'" if dim else "of unknown size"
            raise NormfoldError(
                f"input '{spec.name}' has dynamic dimension {axis} ({label}) in {spec.describe()}; "
                f"give its size with --shape {spec.name}=" + "x".join(
                    str(d) if isinstance(d, int) else "N" for d in spec.dims)
            )
    return tuple(spec.dims)  # type: ignore[arg-type]


def default_dynamic_sizes(specs: list[InputSpec], size: int = 1) -> dict[str, tuple[int, ...]]:
    """Concrete shapes for the inputs of `specs` that have dynamic dimensions:
    each dynamic dimension `size` (for checks that run a model without asking)."""
    return {spec.name: tuple(d if isinstance(d, int) else size for d in spec.dims)
            for spec in specs if not all(isinstance(d, int) for d in spec.dims)}


def random_array(dtype: np.dtype, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """A random array of `dtype`: normal floats, small non-negative integers, coin-flip bools."""
    if dtype == np.bool_:
        return rng.random(shape) < 0.5
    if np.issubdtype(dtype, np.floating):
        return rng.standard_normal(shape).astype(dtype)
    if np.issubdtype(dtype, np.integer):
        high = 256 if dtype == np.uint8 else INT_HIGH
        return rng.integers(0, high, size=shape).astype(dtype)
    raise NormfoldError(f"cannot generate inputs of dtype {dtype}; pass them with --inputs file.npz")


def generate_inputs(
    specs: list[InputSpec],
    shapes: dict[str, tuple[int, ...]] | None = None,
    *,
    seed: int = 0,
    samples: int = 1,
) -> list[Feeds]:
    """`samples` feeds for `specs`, deterministic for a given `seed`.
    `shapes` gives sizes of dynamic dimensions (see `resolve_shape`)."""
    if samples < 1:
        raise NormfoldError(f"--samples must be at least 1, not {samples}")
    shapes = shapes or {}
    concrete = {spec.name: resolve_shape(spec, shapes.get(spec.name)) for spec in specs}
    rng = np.random.default_rng(seed)
    return [{spec.name: random_array(spec.dtype, concrete[spec.name], rng) for spec in specs}
            for _ in range(samples)]


def load_npz(path: str | os.PathLike, specs: list[InputSpec]) -> Feeds:
    """Read one sample from an `.npz` file and check it against `specs`: the same
    names, dtypes and (fixed) sizes. Every problem is listed in one error."""
    path = Path(path)
    if not path.is_file():
        raise NormfoldError(f"{path}: no such file; --inputs takes an .npz file written with numpy.savez")
    feeds = read_npz(path, "write it with numpy.savez")
    check_feeds(feeds, specs, str(path))
    return feeds


def read_npz(path: Path, advice: str) -> Feeds:
    """Every array of the `.npz` file `path`; a file numpy cannot read is one
    NormfoldError ending with `advice`."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return {name: data[name] for name in data.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise unreadable_npz(path, exc, advice) from exc


def unreadable_npz(path: Path, exc: Exception, advice: str) -> NormfoldError:
    """The error for an `.npz` file that cannot be read."""
    return NormfoldError(f"{path}: not a readable .npz file ({exc}); {advice}")


def check_feeds(feeds: Feeds, specs: list[InputSpec], source: str = "inputs") -> None:
    """Raise one NormfoldError listing every way `feeds` (from `source`) does not fit `specs`."""
    problems = _feed_problems(feeds, specs)
    if problems:
        raise NormfoldError(f"{source}: does not match the model inputs: " + "; ".join(problems))


def _feed_problems(feeds: Feeds, specs: list[InputSpec]) -> list[str]:
    wanted = {spec.name: spec for spec in specs}
    problems = []
    missing = [name for name in wanted if name not in feeds]
    extra = [name for name in feeds if name not in wanted]
    if missing:
        problems.append("missing " + ", ".join(wanted[n].describe() for n in missing))
    if extra:
        problems.append("not model inputs: " + ", ".join(extra))
    for name, array in feeds.items():
        spec = wanted.get(name)
        if spec is None:
            continue
        if array.dtype != spec.dtype:
            problems.append(f"'{name}' is {array.dtype}, the model wants {spec.dtype}")
        fixed_ok = len(array.shape) == len(spec.dims) and all(
            not isinstance(want, int) or want == got for want, got in zip(spec.dims, array.shape))
        if not fixed_ok:
            problems.append(f"'{name}' has shape {list(array.shape)}, the model wants {spec.describe()}")
    return problems


Inputs = Feeds | list[Feeds] | str | os.PathLike | None


def resolve_inputs(inputs: Inputs, specs: list[InputSpec], shapes, seed: int, samples: int
                   ) -> tuple[list[Feeds], str]:
    """The samples to run, and a phrase saying where they came from: `inputs` (an
    .npz path, a {name: array} dict or a list of them) checked against `specs`, or,
    when None, generated from `specs` with `seed` (dynamic sizes from `shapes`)."""
    if inputs is None:
        if isinstance(shapes, (list, tuple)):
            parsed = parse_named_shapes(shapes, [s.name for s in specs])
        else:
            parsed = {k: parse_shape(v) if isinstance(v, str) else tuple(v) for k, v in (shapes or {}).items()}
        return generate_inputs(specs, parsed, seed=seed, samples=samples), f"generated inputs, seed {seed}"
    if shapes:
        raise NormfoldError("give either input data or shapes to generate inputs with, not both")
    if isinstance(inputs, (str, os.PathLike)):
        return [load_npz(inputs, specs)], f"inputs from {Path(inputs).name}"
    given = [inputs] if isinstance(inputs, dict) else list(inputs)
    for i, feeds in enumerate(given):
        check_feeds({k: np.asarray(v) for k, v in feeds.items()}, specs, f"inputs sample {i}")
    return [{k: np.asarray(v) for k, v in feeds.items()} for feeds in given], "given inputs"
