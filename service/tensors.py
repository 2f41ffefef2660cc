"""Tensors in KServe raw form (row-major bytes, no padding) <-> numpy arrays.

This is the transport form between the frontend and the model workers, so it has no grpc or protobuf
imports. Fixed-size tensors are viewed with `np.frombuffer` (zero copy); BYTES tensors are a 4-byte
little-endian length followed by the bytes, per element. Sizes are computed with Python ints and
checked against the bytes actually received before anything is allocated.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from service.datatypes import NUMPY_DTYPES, numpy_dtype
from service.errors import InvalidArgument

# numpy refuses arrays whose byte size (zero dims ignored) exceeds the largest intp.
_MAX_NBYTES = 2**63 - 1
_LEN = struct.Struct("<I")

# (numpy kind, itemsize) -> KServe name; byte order is normalised by to_raw.
_DATATYPE_OF_KIND: dict[tuple[str, int], str] = {
    (dt.kind, dt.itemsize): name
    for name, dt in NUMPY_DTYPES.items()
    if name not in ("BF16", "BYTES")
}


@dataclass
class WireTensor:
    """One tensor in raw KServe form: the transport form between frontend and worker."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: bytes | memoryview


def nbytes(data: bytes | memoryview) -> int:
    """Size in bytes of a WireTensor's data (a memoryview's `len` counts items, not bytes)."""
    return data.nbytes if isinstance(data, memoryview) else len(data)


def format_shape(shape: Sequence[int]) -> str:
    """A shape as `[2,3]`, the form used in every error message."""
    return "[" + ",".join(str(d) for d in shape) + "]"


def element_count(shape: Sequence[int]) -> int:
    """Number of elements of a shape (Python int, so it never overflows)."""
    return math.prod(int(d) for d in shape)


def check_shape(datatype: str, shape: Sequence[int], name: str = "tensor") -> tuple[int, ...]:
    """InvalidArgument for a negative dim or a shape numpy cannot represent (even with zero elements);
    returns the shape as Python ints."""
    shape = tuple(map(int, shape))  # numpy integers would overflow the product
    if shape and min(shape) < 0:
        raise InvalidArgument(f"{name}: shape {format_shape(shape)} has a negative dim; dims must be >= 0")
    nonzero = math.prod(shape) or math.prod(d for d in shape if d != 0)
    if nonzero * numpy_dtype(datatype).itemsize > _MAX_NBYTES:
        raise InvalidArgument(
            f"{name}: shape {format_shape(shape)} of {datatype} is too large "
            f"(more than {_MAX_NBYTES} bytes)"
        )
    return shape


def raw_size(datatype: str, shape: Sequence[int]) -> int:
    """Bytes of a fixed-size tensor in raw form; ValueError for BYTES, whose size depends on the data."""
    if datatype == "BYTES":
        raise ValueError("raw_size is undefined for BYTES; use check_bytes on the buffer")
    return element_count(shape) * numpy_dtype(datatype).itemsize


def _byte_view(buf: object) -> memoryview:
    view = memoryview(buf)  # type: ignore[arg-type]
    if view.ndim != 1 or view.format not in ("B", "b", "c"):
        view = view.cast("B")
    return view


_BYTES_LOOP_MAX = 64  # BYTES elements walked one by one even when they share a length


def _bytes_spans(view: memoryview, count: int, name: str) -> tuple[Sequence[int], Sequence[int]]:
    """Start and end offsets of each BYTES element; InvalidArgument unless the prefixes cover `view` exactly."""
    size = view.nbytes
    if 4 * count > size:
        raise InvalidArgument(
            f"{name}: expected {count} BYTES elements (at least {4 * count} bytes of 4-byte length "
            f"prefixes), got {size} bytes"
        )
    if count == 0:
        if size:
            raise InvalidArgument(f"{name}: expected 0 BYTES elements, got {size} bytes")
        return (), ()
    # Fast path for many elements of one length (fixed-width ids, tokens): checked without a loop. For a
    # few, numpy's setup costs more than the loop below.
    first = _LEN.unpack_from(view, 0)[0]
    stride = 4 + first
    if count > _BYTES_LOOP_MAX and stride * count == size:
        rows = np.frombuffer(view, dtype=np.uint8).reshape(count, stride)[:, :4]
        if (rows == np.frombuffer(_LEN.pack(first), dtype=np.uint8)).all():
            return range(4, size + 4, stride), range(stride, size + 1, stride)
    starts: list[int] = []
    ends: list[int] = []
    offset = 0
    for index in range(count):
        if offset + 4 > size:
            raise InvalidArgument(
                f"{name}: BYTES buffer of {size} bytes ends before element {index} of {count}"
            )
        length = _LEN.unpack_from(view, offset)[0]
        offset += 4
        if offset + length > size:
            raise InvalidArgument(
                f"{name}: BYTES element {index} declares {length} bytes but only {size - offset} remain"
            )
        starts.append(offset)
        offset += length
        ends.append(offset)
    if offset != size:
        raise InvalidArgument(
            f"{name}: expected {count} BYTES elements, got {size - offset} bytes after the last one"
        )
    return starts, ends


def check_bytes(buf: object, count: int, name: str = "tensor") -> None:
    """Validate a raw BYTES buffer: its length prefixes describe exactly `count` elements and cover it."""
    _bytes_spans(_byte_view(buf), count, name)


def to_array(datatype: str, shape: Sequence[int], buf: object, *, name: str = "tensor") -> np.ndarray:
    """The raw KServe bytes `buf` as an array of `shape` (a zero-copy, read-only view for fixed sizes).

    BOOL is np.bool_, BF16 stays as <u2 words, BYTES is an object array of `bytes`.
    """
    dtype = numpy_dtype(datatype)
    shape = check_shape(datatype, shape, name)
    view = _byte_view(buf)
    count = math.prod(shape)
    if datatype == "BYTES":
        starts, ends = _bytes_spans(view, count, name)
        elements = (view[s:e].tobytes() for s, e in zip(starts, ends))
        return np.fromiter(elements, dtype=object, count=count).reshape(shape)
    expected = count * dtype.itemsize
    if view.nbytes != expected:
        raise InvalidArgument(
            f"{name}: expected {expected} bytes for shape {format_shape(shape)} of {datatype}, "
            f"got {view.nbytes}"
        )
    array = np.frombuffer(view, dtype=dtype).reshape(shape)
    if datatype == "BOOL" and count and array.view(np.uint8).max() > 1:
        raise InvalidArgument(f"{name}: BOOL elements must be bytes 0 or 1")
    return array


def pack_bytes(elements: Iterable[object], name: str = "tensor") -> bytes:
    """BYTES elements (bytes-like or str, utf-8 encoded) in raw form: 4-byte LE length + bytes each."""
    parts: list[bytes] = []
    for element in elements:
        if isinstance(element, str):
            data = element.encode("utf-8")
        elif isinstance(element, bytes):
            data = element
        elif isinstance(element, (bytearray, memoryview)):
            data = bytes(element)
        else:
            raise InvalidArgument(
                f"{name}: BYTES elements must be bytes or str, got {type(element).__name__}"
            )
        if len(data) > 0xFFFFFFFF:
            raise InvalidArgument(f"{name}: a BYTES element is larger than 4 GiB")
        parts.append(_LEN.pack(len(data)))
        parts.append(data)
    return b"".join(parts)


def to_raw(array: np.ndarray, datatype: str, *, name: str = "tensor") -> bytes | memoryview:
    """`array` in raw KServe form: row-major bytes (a memoryview, no copy when already contiguous).

    Converts byte order and lossless dtype widening (e.g. int32 data for INT64); anything lossy is an
    InvalidArgument so a config/model mismatch surfaces instead of silently truncating.
    """
    array = np.asarray(array)
    if datatype == "BYTES":
        return pack_bytes(array.ravel(order="C"), name)
    dtype = numpy_dtype(datatype)
    if array.dtype == dtype and array.size and array.flags.c_contiguous:  # the common case, as it is
        return memoryview(array).cast("B")
    if datatype == "BF16" and array.dtype.name == "bfloat16":  # ml_dtypes.bfloat16: same 2-byte words
        array = array.view(np.uint16)
    if array.dtype != dtype:
        same = (array.dtype.kind, array.dtype.itemsize) == (dtype.kind, dtype.itemsize)
        if not same and not np.can_cast(array.dtype, dtype, casting="safe"):
            raise InvalidArgument(f"{name}: cannot send an array of {array.dtype} as {datatype} without loss")
    array = np.ascontiguousarray(array, dtype=dtype)
    return memoryview(array.reshape(-1).view(np.uint8))


def datatype_of(array: np.ndarray) -> str:
    """The KServe datatype name of an array's dtype (object, str and bytes arrays are BYTES)."""
    dtype = np.asarray(array).dtype
    if dtype.kind in "OSU":
        return "BYTES"
    if dtype.name == "bfloat16":
        return "BF16"
    try:
        return _DATATYPE_OF_KIND[(dtype.kind, dtype.itemsize)]
    except KeyError:
        raise InvalidArgument(f"numpy dtype {dtype} has no KServe datatype") from None
