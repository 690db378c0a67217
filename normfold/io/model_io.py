"""Loading and saving ONNX models safely.

Every command reads and writes models through this module, so the rules hold
everywhere: bad input is one clear `NormfoldError` line, external data never
resolves outside the model's folder, outputs are written atomically, and the
input file is never written over unless the caller asks for it.
"""

from __future__ import annotations

import io
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterable, Mapping

import google.protobuf.message
import onnx
import onnx.checker
import onnx.defs
import onnx.numpy_helper
import onnx.shape_inference
from onnx.external_data_helper import ExternalDataInfo, _get_all_tensors, _get_initializer_tensors

from normfold.errors import NormfoldError
from normfold.io.checks import StructureError, check_structure, check_tensor_data, check_text, printable, quote

PROTOBUF_LIMIT = 2**31 - 1
# Tensors at least this big go to the external-data file when saving externally.
EXTERNAL_THRESHOLD_BYTES = 1024
# Initializers with more elements than this are "large": skeleton() replaces them
# by typed graph inputs, and they may be kept out of memory until written.
LARGE_TENSOR_ELEMENTS = 1024
_GRAPH_FIELD = onnx.ModelProto.DESCRIPTOR.fields_by_name["graph"].number
_INITIALIZER_FIELD = onnx.GraphProto.DESCRIPTOR.fields_by_name["initializer"].number
_RAW_DATA_FIELD = onnx.TensorProto.DESCRIPTOR.fields_by_name["raw_data"].number


@dataclass
class DetachedTensor:
    """Data of a large initializer kept out of the in-memory model until it is
    written: the model holds a data-less placeholder of the same name."""

    nbytes: int
    load: Callable[[], onnx.TensorProto]


@dataclass
class LoadedModel:
    """A model read from disk, with where it came from."""

    model: onnx.ModelProto
    path: Path
    had_external_data: bool
    file_bytes: int  # size of the .onnx file plus its external-data files
    external_files: tuple[Path, ...] = ()


def load_model(path: str | os.PathLike, weights: bool = True) -> LoadedModel:
    """Read an ONNX model (and its external data) or raise a one-line NormfoldError.
    `weights=False` checks the external data but leaves it on disk (the tensors keep
    their external references): for callers that hand onnxruntime the path."""
    path = Path(path)
    if not path.exists():
        raise NormfoldError(f"{path}: no such file; check the path to the .onnx model")
    if path.is_dir():
        raise NormfoldError(f"{path}: is a folder; give the path of an .onnx file")
    try:
        with path.open("rb") as f:
            model = _parse_model(f, path.stat().st_size)
    except OSError as exc:
        raise NormfoldError(f"{path}: cannot read the file ({exc.strerror})") from exc
    except StructureError as exc:
        raise _invalid(path, exc) from exc
    except (google.protobuf.message.DecodeError, ValueError, RuntimeError) as exc:
        raise NormfoldError(
            f"{path}: not an ONNX model (the protobuf does not parse: the file is truncated, "
            "corrupted or of another format); re-export or re-download it"
        ) from exc
    if model.ir_version == 0 or not model.HasField("graph") or not model.opset_import:
        raise NormfoldError(
            f"{path}: not an ONNX model (no IR version, graph or opset; the file may be truncated "
            "or of another format); re-export or re-download it"
        )
    try:
        check_text(model)
        _check_versions(model, path)
        external = _external_tensors(model)
        files = _check_external_files(external, path)
        if external and weights:
            onnx.external_data_helper.load_external_data_for_model(model, str(path.parent))
        check_structure(model)
    except StructureError as exc:
        raise _invalid(path, exc) from exc
    _check_valid(model, path)
    return LoadedModel(
        model=model, path=path, had_external_data=bool(external),
        file_bytes=path.stat().st_size + sum(files.values()), external_files=tuple(files),
    )


def model_and_name(source: onnx.ModelProto | str | os.PathLike, weights: bool = True
                   ) -> tuple[onnx.ModelProto, str]:
    """`source` (a ModelProto, or a path loaded with `load_model`) and the name
    reports show for it."""
    if isinstance(source, onnx.ModelProto):
        return source, f"ModelProto '{source.graph.name}'" if source.graph.name else "ModelProto"
    return load_model(source, weights=weights).model, str(source)


def _parse_model(f: BinaryIO, size: int) -> onnx.ModelProto:
    """Parse a ModelProto record by record, so that peak memory is the model plus
    one initializer (reading the whole file first would double it). Each
    top-level record and each record of the graph is merged in on its own:
    protobuf defines a message as the merge of its records."""
    model = onnx.ModelProto()
    for field, wire, start, header, length in _records(f, 0, size):
        if field == _GRAPH_FIELD and wire == 2:
            for sub_field, sub_wire, sub_start, sub_header, sub_length in _records(f, start + header, start + header + length):
                f.seek(sub_start)
                if sub_field == _INITIALIZER_FIELD and sub_wire == 2:
                    f.seek(sub_start + sub_header)
                    record = _read(f, sub_length)
                    tensor = model.graph.initializer.add()
                    tensor.ParseFromString(record)
                    check_tensor_data(tensor, raw_size=_raw_data_size(record))
                else:
                    model.graph.MergeFromString(_read(f, sub_header + sub_length))
        else:
            f.seek(start)
            model.MergeFromString(_read(f, header + length))
    return model


def _raw_data_size(record: bytes) -> int | None:
    """Bytes of raw data in a serialized TensorProto (read from the record, so
    the data is not copied), or None when it has none."""
    sizes = [length for field, wire, _, _, length in _records(io.BytesIO(record), 0, len(record))
             if field == _RAW_DATA_FIELD and wire == 2]
    return sum(sizes) if sizes else None


def _read(f: BinaryIO, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise google.protobuf.message.DecodeError("truncated")
    return data


def _records(f: BinaryIO, begin: int, end: int):
    """(field number, wire type, start, header length, payload length) of each
    protobuf record between offsets `begin` and `end` of `f`."""
    position = begin
    while position < end:
        f.seek(position)
        key, key_length = _read_varint(f)
        field, wire = key >> 3, key & 7
        if wire == 0:
            _, length = _read_varint(f)
            header, length = key_length, length
        elif wire == 1:
            header, length = key_length, 8
        elif wire == 5:
            header, length = key_length, 4
        elif wire == 2:
            length, length_bytes = _read_varint(f)
            header = key_length + length_bytes
        else:
            raise google.protobuf.message.DecodeError(f"unsupported wire type {wire}")
        if field == 0 or position + header + length > end:
            raise google.protobuf.message.DecodeError("truncated or corrupt record")
        yield field, wire, position, header, length
        position += header + length


def _read_varint(f: BinaryIO) -> tuple[int, int]:
    """(value, number of bytes) of the varint at the current position."""
    value = shift = 0
    for count in range(1, 11):
        byte = f.read(1)
        if not byte:
            raise google.protobuf.message.DecodeError("truncated varint")
        value |= (byte[0] & 0x7F) << shift
        if not byte[0] & 0x80:
            return value, count
        shift += 7
    raise google.protobuf.message.DecodeError("varint too long")


def _check_versions(model: onnx.ModelProto, path: Path) -> None:
    if model.ir_version > onnx.IR_VERSION:
        raise NormfoldError(
            f"{path}: IR version {model.ir_version} is newer than the installed onnx "
            f"{onnx.__version__} supports (max {onnx.IR_VERSION}); upgrade onnx "
            "(pip install -U onnx) or export with an older IR version"
        )
    newest = onnx.defs.onnx_opset_version()
    for opset in model.opset_import:
        if opset.domain in ("", "ai.onnx") and opset.version > newest:
            raise NormfoldError(
                f"{path}: opset {opset.version} is newer than the installed onnx "
                f"{onnx.__version__} supports (max {newest}); upgrade onnx or export "
                "with an older opset"
            )


def _external_tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    return [
        t
        for t in _get_all_tensors(model)
        if t.HasField("data_location") and t.data_location == onnx.TensorProto.EXTERNAL
    ]


def _check_external_files(tensors: list[onnx.TensorProto], path: Path) -> dict[Path, int]:
    """Validate every external-data reference before anything is read; return the
    referenced files and their sizes."""
    base = path.parent.resolve()
    sizes: dict[Path, int] = {}
    for tensor in tensors:
        try:
            info = ExternalDataInfo(tensor)
        except ValueError as exc:  # offset/length not a non-negative integer
            raise NormfoldError(f"{path}: tensor {quote(tensor.name)} has a bad external-data reference ({printable(str(exc), 200)}); "
                                "re-export the model") from exc
        location = info.location
        if not location or os.path.isabs(location) or Path(location).drive:
            raise NormfoldError(
                f"{path}: tensor {quote(tensor.name)} points at external data {quote(location)} outside "
                "the model's folder (absolute path); refusing to read it. Keep external data "
                "files next to the model and reference them by relative name"
            )
        target = (base / location).resolve()
        if base != target and base not in target.parents:
            raise NormfoldError(
                f"{path}: tensor {quote(tensor.name)} points at external data {quote(location)}, which "
                "resolves outside the model's folder; refusing to read it. Keep external data "
                "files next to the model and reference them by relative name"
            )
        if target not in sizes:
            if not target.is_file():
                problem = "not a regular file" if target.exists() else "missing"
                raise NormfoldError(
                    f"{path}: external data file {quote(location)} (for tensor {quote(tensor.name)}) is "
                    f"{problem}; copy it next to the model into {base}"
                )
            sizes[target] = target.stat().st_size
        end = (info.offset or 0) + (info.length or 0)
        if info.length is not None and end > sizes[target]:
            raise NormfoldError(
                f"{path}: external data file {quote(location)} is truncated ({sizes[target]} bytes, "
                f"tensor {quote(tensor.name)} needs bytes up to {end}); copy the complete file again"
            )
        available = sizes[target] - (info.offset or 0)
        check_tensor_data(tensor, raw_size=info.length if info.length is not None else max(0, available))
    return sizes


def _invalid(path: Path, problem: StructureError) -> NormfoldError:
    return NormfoldError(f"{path}: not a valid ONNX model: {problem}; re-export it (the file may be "
                         "corrupted or hand-edited)")


def _check_valid(model: onnx.ModelProto, path: Path) -> None:
    """onnx.checker with strict shape inference: a declared shape or type the
    graph contradicts is bad input here, not a normfold bug when the output is checked."""
    try:
        onnx.checker.check_model(skeleton(model), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError, ValueError) as exc:
        first = printable(str(exc).strip().splitlines()[0], 300) if str(exc).strip() else type(exc).__name__
        raise NormfoldError(
            f"{path}: not a valid ONNX model ({first}); the file may be truncated or "
            "hand-edited: re-export it"
        ) from exc


def skeleton(model: onnx.ModelProto, max_elements: int = LARGE_TENSOR_ELEMENTS) -> onnx.ModelProto:
    """A copy of `model` without its large weights, for the checker and shape
    inference: each main-graph initializer over `max_elements` elements (or with its
    data still on disk) becomes a graph input of the same type and shape. Cheap even
    for multi-GB models."""
    skel = onnx.ModelProto()
    graph = model.graph
    copy_model_fields(model, skel, skip=("graph",))
    sg = skel.graph
    sg.name = graph.name
    sg.doc_string = graph.doc_string
    sg.node.extend(graph.node)
    sg.input.extend(graph.input)
    sg.output.extend(graph.output)
    sg.value_info.extend(graph.value_info)
    sg.sparse_initializer.extend(graph.sparse_initializer)
    sg.quantization_annotation.extend(graph.quantization_annotation)
    declared = {i.name for i in graph.input}
    for init in graph.initializer:
        count = 1
        for d in init.dims:
            count *= d
        if count <= max_elements and init.data_location != onnx.TensorProto.EXTERNAL:
            sg.initializer.append(init)
        elif init.name not in declared:
            sg.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, init.dims))
    return skel


def copy_model_fields(src: onnx.ModelProto, dst: onnx.ModelProto, skip: tuple[str, ...]) -> None:
    """Copy every set field of `src` except those named in `skip` into `dst`."""
    for field, value in src.ListFields():
        if field.name in skip:
            continue
        if field.message_type is not None or hasattr(value, "extend"):  # message or repeated
            getattr(dst, field.name).MergeFrom(value)
        else:
            setattr(dst, field.name, value)


def check_output(model: onnx.ModelProto) -> None:
    """Run the onnx checker and strict shape inference on a model normfold made.
    A failure here is a normfold bug, reported as such."""
    try:
        onnx.checker.check_model(skeleton(model), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise RuntimeError(
            f"normfold produced an invalid model ({exc}); this is a bug in normfold, "
            "please report it with the input model"
        ) from exc


def model_bytes(model: onnx.ModelProto) -> int:
    """Serialized size of the model, counting external tensors at full size."""
    return model.ByteSize()


def save_model(
    model: onnx.ModelProto,
    out: str | os.PathLike,
    *,
    source: Path | None = None,
    protect: Iterable[Path] = (),
    inplace: bool = False,
    external_data: bool | None = None,
    check: bool = True,
    detached: Mapping[str, DetachedTensor] | None = None,
    before_commit: Callable[[Path], bool] | None = None,
) -> int:
    """Check `model`, then write it to `out` atomically and return the bytes written.

    `source` is the input path and `protect` its external-data files: writing
    over any of them is refused unless `inplace`.
    `external_data=None` stores weights externally (in `<out name>.data`) only
    when the model is over 2 GB. `detached` supplies the data of placeholder
    initializers, loaded one at a time while writing.
    `before_commit(staged)` is called with the complete model written to a
    staging folder beside `out`; only if it returns True are the files moved
    into place, else nothing is written and 0 is returned.
    """
    detached = detached or {}
    out = Path(out)
    if source is not None and not inplace and _same_file(out, source):
        raise NormfoldError(
            f"{out}: refusing to overwrite the input model; pass -o OUT to write elsewhere "
            "or --inplace to replace it"
        )
    if any(_same_file(out, p) for p in protect):
        raise NormfoldError(f"{out}: is the input's external data file; refusing to overwrite it, choose another -o path")
    if out.is_dir():
        raise NormfoldError(f"{out}: is a folder; give the path of the .onnx file to write")
    folder = out.parent if str(out.parent) else Path(".")
    if not folder.is_dir():
        raise NormfoldError(f"{out}: output folder {folder} does not exist; create it first")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise NormfoldError(f"{out}: output folder {folder} is not writable; choose another -o path")
    if check:
        check_output(model)
    if external_data is None:
        external_data = model_bytes(model) + sum(d.nbytes for d in detached.values()) > PROTOBUF_LIMIT
    if external_data:
        data_file = out.parent / (out.name + ".data")
        if not inplace and any(_same_file(data_file, p) for p in protect):
            raise NormfoldError(
                f"{out}: its weights file {data_file.name} would overwrite the input's external "
                "data; choose another -o name"
            )
    if before_commit is None:
        return _write(model, out, detached, external_data)
    try:
        staging = tempfile.TemporaryDirectory(dir=folder, prefix=".normfold-staged-")
    except OSError as exc:
        raise NormfoldError(f"{out}: cannot write in {folder} ({exc.strerror}); choose another -o path") from exc
    with staging as stage:
        staged = Path(stage) / out.name
        written = _write(model, staged, detached, external_data)
        if not before_commit(staged):
            return 0
        for file in Path(stage).iterdir():
            os.replace(file, folder / file.name)
    return written


def _write(model: onnx.ModelProto, out: Path, detached: Mapping[str, DetachedTensor], external_data: bool) -> int:
    if external_data:
        return _write_external(model, out, detached)
    return _write_single(model, out, detached)


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


def _temp_file(folder: Path, name: str) -> tuple[int, str]:
    try:
        return tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=folder)
    except OSError as exc:
        raise NormfoldError(
            f"{folder / name}: cannot write in {folder} ({exc.strerror}); choose another -o path"
        ) from exc


def _write_atomic(out: Path, chunks: Iterable[bytes]) -> int:
    folder = out.parent if str(out.parent) else Path(".")
    fd, tmp = _temp_file(folder, out.name)
    written = 0
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
                written += len(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return written


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _write_single(model: onnx.ModelProto, out: Path, detached: Mapping[str, DetachedTensor]) -> int:
    """One .onnx file. Detached initializers are appended one at a time, each as
    its own `graph { initializer }` record: protobuf parsers merge repeated
    occurrences of a message field, so the file reads as one graph."""
    if not detached:
        return _write_atomic(out, [model.SerializeToString()])
    head = onnx.ModelProto()
    head.CopyFrom(model)  # cheap: placeholders hold no data
    kept = [t for t in model.graph.initializer if t.name not in detached]
    del head.graph.initializer[:]
    head.graph.initializer.extend(kept)

    def records():
        yield head.SerializeToString()
        for name, tensor in detached.items():
            proto = tensor.load()
            proto.name = name
            body = proto.SerializeToString()
            inner = _varint(_INITIALIZER_FIELD << 3 | 2) + _varint(len(body))
            yield _varint(_GRAPH_FIELD << 3 | 2) + _varint(len(inner) + len(body)) + inner
            yield body

    return _write_atomic(out, records())


def _write_external(model: onnx.ModelProto, out: Path, detached: Mapping[str, DetachedTensor]) -> int:
    """Write large tensors to `<out>.data` and the graph to `out`, each atomically.
    The in-memory model is left as it was."""
    location = out.name + ".data"
    folder = out.parent if str(out.parent) else Path(".")
    restore: list[tuple[onnx.TensorProto, bytes | None]] = []
    fd, tmp_data = _temp_file(folder, location)
    try:
        offset = 0
        with os.fdopen(fd, "wb") as f:
            # initializers only: a tensor in a node attribute (a Constant's value) has no name, and
            # onnx and onnxruntime resolve its external location against the working folder, not the
            # model's ("Data of TensorProto ( tensor name: ) ... is not regular file"); it stays inline
            for tensor in _get_initializer_tensors(model):
                if tensor.name in detached and tensor.data_location != onnx.TensorProto.EXTERNAL:
                    raw, kept = _raw_bytes(detached[tensor.name].load()), None
                elif tensor.HasField("raw_data") and len(tensor.raw_data) >= EXTERNAL_THRESHOLD_BYTES:
                    raw = kept = tensor.raw_data
                    tensor.ClearField("raw_data")
                else:
                    continue
                restore.append((tensor, kept))
                pad = (-offset) % 4096
                f.write(b"\0" * pad)
                offset += pad
                f.write(raw)
                tensor.data_location = onnx.TensorProto.EXTERNAL
                del tensor.external_data[:]
                for key, value in (("location", location), ("offset", offset), ("length", len(raw))):
                    entry = tensor.external_data.add()
                    entry.key, entry.value = key, str(value)
                offset += len(raw)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp_data, 0o644)
        os.replace(tmp_data, folder / location)
        written = offset + _write_atomic(out, [model.SerializeToString()])
    except BaseException:
        Path(tmp_data).unlink(missing_ok=True)
        raise
    finally:
        for tensor, raw in restore:
            del tensor.external_data[:]
            tensor.data_location = onnx.TensorProto.DEFAULT
            if raw is not None:
                tensor.raw_data = raw
    return written


def _raw_bytes(tensor: onnx.TensorProto) -> bytes:
    if tensor.HasField("raw_data"):
        return tensor.raw_data
    return onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(tensor)).raw_data
