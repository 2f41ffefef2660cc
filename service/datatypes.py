"""KServe v2 datatype names, their numpy dtypes and Triton config enum names, in one table.

BYTES elements travel in raw form as a 4-byte little-endian length followed by the bytes; in numpy they
are object arrays of `bytes`. BF16 has no numpy dtype: it is carried as raw 2-byte words (uint16 view).
"""

from __future__ import annotations

import numpy as np

from service.errors import InvalidArgument

# KServe datatype -> numpy dtype (little-endian, as on the wire). BYTES is variable-size (object).
NUMPY_DTYPES: dict[str, np.dtype] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),  # raw bfloat16 words; numpy has no bfloat16
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BYTES": np.dtype(object),
}

# KServe datatype <-> Triton model_config DataType enum name (config.pbtxt `data_type`).
CONFIG_TYPES: dict[str, str] = {
    name: ("TYPE_STRING" if name == "BYTES" else f"TYPE_{name}") for name in NUMPY_DTYPES
}
DATATYPE_OF_CONFIG_TYPE: dict[str, str] = {v: k for k, v in CONFIG_TYPES.items()}


def numpy_dtype(datatype: str) -> np.dtype:
    """The numpy dtype for a KServe datatype name; InvalidArgument for an unknown name."""
    try:
        return NUMPY_DTYPES[datatype]
    except KeyError:
        raise InvalidArgument(
            f"unknown datatype '{datatype}'; expected one of {', '.join(NUMPY_DTYPES)}"
        ) from None


def element_size(datatype: str) -> int:
    """Bytes per element of a fixed-size datatype (0 for BYTES, whose elements vary)."""
    return 0 if datatype == "BYTES" else numpy_dtype(datatype).itemsize
