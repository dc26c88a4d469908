"""Tensors on the wire: `TensorData` to and from numpy and torch, validation, and chunking.

`TensorSpec` says which tensors a torch stage's model accepts; the engine checks every
request's tensor against it before the model's `preprocess` sees it.

A `TensorData` is a dtype name, a shape and the raw little-endian C-order bytes. numpy is a
dependency of omnistage; torch is imported only by the functions that take or return torch
tensors, so a client without torch can still send and receive numpy arrays.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from omnistage.errors import InvalidRequestError, echo
from omnistage.types import TensorData

if TYPE_CHECKING:
    import torch

DEFAULT_MAX_CHUNK_BYTES = 3 << 20
"""Chunks stay under gRPC's default 4 MiB receive limit, with room for the envelope."""

_NUMPY_DTYPES: dict[str, str] = {
    "float32": "<f4",
    "float16": "<f2",
    "float64": "<f8",
    "int64": "<i8",
    "int32": "<i4",
    "int16": "<i2",
    "int8": "i1",
    "uint8": "u1",
    "bool": "?",
}
_ITEMSIZES: dict[str, int] = {
    **{name: np.dtype(code).itemsize for name, code in _NUMPY_DTYPES.items()},
    "bfloat16": 2,
}
DTYPES: tuple[str, ...] = tuple(_ITEMSIZES)
"""The dtype names a `TensorData` may carry."""


def itemsize(dtype: str) -> int:
    """Bytes per element of `dtype`; InvalidRequestError for an unknown name."""
    try:
        return _ITEMSIZES[dtype]
    except KeyError:
        raise InvalidRequestError(
            f"tensor dtype {echo(dtype)} is unknown; use one of {', '.join(DTYPES)}"
        ) from None


def validate_tensor(tensor: TensorData) -> None:
    """Check the dtype name, the shape and that the bytes match prod(shape) * itemsize."""
    size = itemsize(tensor.dtype)
    if any(dim < 0 for dim in tensor.shape):
        raise InvalidRequestError(
            f"tensor shape {list(tensor.shape)} has a negative dimension; every dim must be ≥ 0"
        )
    count = math.prod(tensor.shape)
    expected = count * size
    if len(tensor.data) != expected:
        raise InvalidRequestError(
            f"tensor data is {len(tensor.data)} bytes but shape {list(tensor.shape)} of "
            f"{tensor.dtype} needs {expected} bytes ({count} elements × {size}); send "
            "little-endian C-order bytes that match the shape"
        )


Dim = int | str | None
"""One dim of a `TensorSpec` shape: a fixed size, or a free one (None, or a name such as "T")."""


@dataclass(frozen=True)
class TensorSpec:
    """The tensor input a model accepts: dtypes and shape patterns, checked before preprocess.

    `shapes` lists the accepted patterns; a tensor must match one of them. In a pattern an int
    is a fixed size, and None or a name (e.g. "T", shown in messages) is a free dim of any
    size; names are labels only and do not tie dims together. Empty `dtypes` or `shapes`
    accept any. With `required`, a request without a tensor is refused; without it, requests
    with other inputs (token_ids, prompt) are left to the model's preprocess.
    """

    dtypes: tuple[str, ...] = ()
    shapes: tuple[tuple[Dim, ...], ...] = ()
    required: bool = True

    def __post_init__(self) -> None:
        for dtype in self.dtypes:
            itemsize(dtype)
        for shape in self.shapes:
            for dim in shape:
                if isinstance(dim, bool) or not (
                    dim is None or isinstance(dim, str) or (isinstance(dim, int) and dim >= 0)
                ):
                    raise InvalidRequestError(
                        f"TensorSpec shape {list(shape)}: each dim is an int ≥ 0, None or a "
                        f"name; got {echo(dim)}"
                    )

    def describe(self) -> str:
        """What the spec accepts, e.g. `int64 or int32, shape [T] or [1, T]`."""
        dtypes = " or ".join(self.dtypes) if self.dtypes else "any dtype"
        shapes = " or ".join(_pattern(shape) for shape in self.shapes) or "any"
        return f"{dtypes}, shape {shapes}"

    def check(self, tensor: TensorData | None, *, other_inputs: Sequence[str] = ()) -> None:
        """InvalidRequestError naming what was expected and what was given, unless it fits."""
        if tensor is None:
            if self.required:
                given = ", ".join(other_inputs) or "no input"
                raise InvalidRequestError(
                    f"this stage takes a tensor input ({self.describe()}); got {given}"
                )
            return
        dtype_ok = not self.dtypes or tensor.dtype in self.dtypes
        shape_ok = not self.shapes or any(_matches(tensor.shape, s) for s in self.shapes)
        if not (dtype_ok and shape_ok):
            wrong = [what for what, ok in (("dtype", dtype_ok), ("shape", shape_ok)) if not ok]
            raise InvalidRequestError(
                f"tensor {' and '.join(wrong)} not accepted: expected {self.describe()}; "
                f"got {tensor.dtype}, shape {list(tensor.shape)}"
            )


def _matches(shape: tuple[int, ...], pattern: tuple[Dim, ...]) -> bool:
    return len(shape) == len(pattern) and all(
        not isinstance(want, int) or want == got for got, want in zip(shape, pattern, strict=True)
    )


def _pattern(pattern: tuple[Dim, ...]) -> str:
    return "[" + ", ".join("*" if d is None else str(d) for d in pattern) + "]"


def tensor_to_numpy(tensor: TensorData) -> np.ndarray[Any, Any]:
    """A new, writable numpy array in native byte order. bfloat16 has no numpy dtype."""
    validate_tensor(tensor)
    if tensor.dtype == "bfloat16":
        raise InvalidRequestError(
            "bfloat16 has no numpy dtype: read it with tensor_to_torch, or send float32"
        )
    wire = np.dtype(_NUMPY_DTYPES[tensor.dtype])
    array = np.frombuffer(tensor.data, dtype=wire).astype(wire.newbyteorder("="))
    return array.reshape(tensor.shape)


def tensor_from_numpy(array: np.ndarray[Any, Any]) -> TensorData:
    """The array's dtype, shape and little-endian C-order bytes."""
    name = _numpy_dtype_name(array.dtype)
    wire = np.ascontiguousarray(array, dtype=np.dtype(_NUMPY_DTYPES[name]))
    return TensorData(dtype=name, shape=tuple(int(d) for d in array.shape), data=wire.tobytes())


def tensor_to_torch(
    tensor: TensorData, *, device: str | torch.device | None = None
) -> torch.Tensor:
    """A new CPU (or `device`) torch tensor; bfloat16 included."""
    import torch

    validate_tensor(tensor)
    if tensor.dtype == "bfloat16":
        bits = np.frombuffer(tensor.data, dtype="<i2").astype(np.int16).reshape(tensor.shape)
        result = torch.from_numpy(bits).view(torch.bfloat16)
    else:
        result = torch.from_numpy(tensor_to_numpy(tensor))
    return result if device is None else result.to(device)


def tensor_from_torch(tensor: torch.Tensor) -> TensorData:
    """The tensor's dtype, shape and little-endian C-order bytes (copied to the CPU)."""
    import torch

    host = tensor.detach().cpu().contiguous()
    if host.dtype == torch.bfloat16:
        bits = host.view(torch.int16).numpy().astype("<i2")
        return TensorData(dtype="bfloat16", shape=tuple(host.shape), data=bits.tobytes())
    name = str(host.dtype).removeprefix("torch.")
    if name not in _NUMPY_DTYPES:
        raise InvalidRequestError(
            f"torch dtype {host.dtype} cannot travel; convert it to one of {', '.join(DTYPES)}"
        )
    return tensor_from_numpy(host.numpy())


def split_tensor(tensor: TensorData, max_bytes: int = DEFAULT_MAX_CHUNK_BYTES) -> list[TensorData]:
    """Split along dim 0 into chunks of at most `max_bytes` bytes each; `join_tensors` undoes it.

    A tensor that fits comes back as the only chunk. The chunks' data are views of the
    tensor's bytes, not copies.
    """
    validate_tensor(tensor)
    if max_bytes < 1:
        raise InvalidRequestError(f"max_bytes must be ≥ 1 (got {max_bytes})")
    if len(tensor.data) <= max_bytes:
        return [tensor]
    if not tensor.shape:
        raise InvalidRequestError(
            f"a 0-d tensor of {len(tensor.data)} bytes cannot be split below {max_bytes} bytes"
        )
    row_bytes = math.prod(tensor.shape[1:]) * itemsize(tensor.dtype)
    if row_bytes > max_bytes:
        raise InvalidRequestError(
            f"one row along dim 0 of shape {list(tensor.shape)} is {row_bytes} bytes, over "
            f"max_bytes {max_bytes}; reshape the tensor so dim 0 is longer, or raise max_bytes"
        )
    rows = max_bytes // row_bytes
    chunks = []
    for start in range(0, tensor.shape[0], rows):
        count = min(rows, tensor.shape[0] - start)
        data = memoryview(tensor.data)[start * row_bytes : (start + count) * row_bytes]
        chunks.append(TensorData(tensor.dtype, (count, *tensor.shape[1:]), data))
    return chunks


def join_tensors(chunks: Sequence[TensorData]) -> TensorData:
    """Concatenate chunks along dim 0; they must share dtype and shape[1:]."""
    if not chunks:
        raise InvalidRequestError("join_tensors needs at least one chunk")
    first = chunks[0]
    for index, chunk in enumerate(chunks):
        validate_tensor(chunk)
        if not chunk.shape:
            raise InvalidRequestError(f"chunk {index} is 0-d; only tensors with a dim 0 join")
        if chunk.dtype != first.dtype or chunk.shape[1:] != first.shape[1:]:
            raise InvalidRequestError(
                f"chunk {index} is {chunk.dtype} {list(chunk.shape)} but chunk 0 is "
                f"{first.dtype} {list(first.shape)}; chunks must share dtype and shape[1:]"
            )
    rows = sum(chunk.shape[0] for chunk in chunks)
    return TensorData(
        first.dtype, (rows, *first.shape[1:]), b"".join(chunk.data for chunk in chunks)
    )


def _numpy_dtype_name(dtype: np.dtype[Any]) -> str:
    for name, code in _NUMPY_DTYPES.items():
        if np.dtype(code).newbyteorder("=") == dtype.newbyteorder("="):
            return name
    raise InvalidRequestError(
        f"numpy dtype {dtype} cannot travel; convert it to one of {', '.join(DTYPES)}"
    )
