"""Tensors on the wire: round trips for every dtype, validation messages, split and join,
and the `TensorSpec` a torch model declares."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from omnistage.convert import tensor_from_pb, tensor_to_pb
from omnistage.errors import InvalidRequestError
from omnistage.tensors import (
    DTYPES,
    TensorSpec,
    itemsize,
    join_tensors,
    split_tensor,
    tensor_from_numpy,
    tensor_from_torch,
    tensor_to_numpy,
    tensor_to_torch,
    validate_tensor,
)
from omnistage.types import TensorData

NUMPY_DTYPES = [d for d in DTYPES if d != "bfloat16"]


def sample(dtype: str, shape: tuple[int, ...] = (3, 4)) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(shape, generator=generator) * 50
    if dtype == "bool":
        return values > 0
    return values.to(getattr(torch, dtype))


def test_every_dtype_is_listed() -> None:
    assert set(DTYPES) == {
        "float32",
        "float16",
        "bfloat16",
        "float64",
        "int64",
        "int32",
        "int16",
        "int8",
        "uint8",
        "bool",
    }


@pytest.mark.parametrize("dtype", DTYPES)
def test_torch_round_trip(dtype: str) -> None:
    original = sample(dtype)
    wire = tensor_from_torch(original)
    assert wire.dtype == dtype
    assert wire.shape == (3, 4)
    assert len(wire.data) == 12 * itemsize(dtype)
    back = tensor_to_torch(tensor_from_pb(tensor_to_pb(wire)))
    assert back.dtype == original.dtype
    assert torch.equal(back, original)


@pytest.mark.parametrize("dtype", NUMPY_DTYPES)
def test_numpy_round_trip(dtype: str) -> None:
    original = sample(dtype).numpy()
    wire = tensor_from_numpy(original)
    assert wire.dtype == dtype
    back = tensor_to_numpy(wire)
    assert back.dtype == original.dtype
    np.testing.assert_array_equal(back, original)
    back[0, 0] = back[0, 1]  # a writable copy, not a view of the message's bytes


@pytest.mark.parametrize("dtype", NUMPY_DTYPES)
def test_numpy_and_torch_agree_on_the_bytes(dtype: str) -> None:
    original = sample(dtype)
    assert tensor_from_torch(original) == tensor_from_numpy(original.numpy())


def test_bytes_are_little_endian_c_order() -> None:
    wire = tensor_from_numpy(np.array([[1, 2], [3, 4]], dtype=">i4").T)
    assert wire.data == np.array([1, 3, 2, 4], dtype="<i4").tobytes()
    assert wire.shape == (2, 2)


def test_zero_d_and_empty_tensors() -> None:
    scalar = tensor_from_torch(torch.tensor(2.5))
    assert scalar.shape == () and tensor_to_torch(scalar).item() == 2.5
    empty = tensor_from_numpy(np.zeros((0, 3), dtype=np.float32))
    assert tensor_to_torch(empty).shape == (0, 3)


def test_byte_count_mismatch_names_both_numbers() -> None:
    with pytest.raises(InvalidRequestError) as info:
        validate_tensor(TensorData("int64", (2, 5), b"\0" * 79))
    message = str(info.value)
    assert "79" in message and "80" in message and "[2, 5]" in message


def test_unknown_dtype_lists_the_known_ones() -> None:
    with pytest.raises(InvalidRequestError) as info:
        validate_tensor(TensorData("complex64", (1,), b"\0" * 8))
    assert "complex64" in str(info.value)
    for name in DTYPES:
        assert name in str(info.value)


def test_negative_dimension_is_invalid() -> None:
    with pytest.raises(InvalidRequestError, match="negative"):
        validate_tensor(TensorData("uint8", (-1,), b""))


def test_bfloat16_has_no_numpy_dtype() -> None:
    with pytest.raises(InvalidRequestError, match="tensor_to_torch"):
        tensor_to_numpy(tensor_from_torch(sample("bfloat16")))


def test_untravelled_dtypes_are_refused() -> None:
    with pytest.raises(InvalidRequestError, match="complex64"):
        tensor_from_torch(torch.zeros(2, dtype=torch.complex64))
    with pytest.raises(InvalidRequestError, match="float32"):
        tensor_from_numpy(np.zeros(2, dtype=np.complex64))


def test_split_keeps_every_chunk_within_the_limit_and_join_undoes_it() -> None:
    wire = tensor_from_torch(torch.arange(1000 * 7, dtype=torch.float32).reshape(1000, 7))
    chunks = split_tensor(wire, max_bytes=1000)
    assert len(chunks) == -(-1000 // (1000 // 28))
    assert all(len(c.data) <= 1000 for c in chunks)
    assert all(c.shape[1:] == (7,) for c in chunks)
    for chunk in chunks:
        validate_tensor(chunk)
    assert join_tensors(chunks) == wire


def test_split_default_limit_stays_under_grpcs_4_mib() -> None:
    wire = tensor_from_numpy(np.zeros((5 << 20) // 4, dtype=np.float32))
    chunks = split_tensor(wire)
    assert len(chunks) == 2
    assert all(len(c.data) < 4 << 20 for c in chunks)
    assert join_tensors(chunks) == wire


def test_a_tensor_that_fits_is_one_chunk() -> None:
    wire = tensor_from_torch(torch.ones(3, 3))
    assert split_tensor(wire) == [wire]


def test_split_refuses_a_row_larger_than_the_limit() -> None:
    wire = tensor_from_torch(torch.ones(2, 100))
    with pytest.raises(InvalidRequestError) as info:
        split_tensor(wire, max_bytes=100)
    assert "400" in str(info.value) and "100" in str(info.value)


def test_join_refuses_mismatched_chunks() -> None:
    a = tensor_from_torch(torch.ones(2, 3))
    b = tensor_from_torch(torch.ones(2, 4))
    with pytest.raises(InvalidRequestError, match="chunk 1"):
        join_tensors([a, b])
    with pytest.raises(InvalidRequestError, match="chunk 1"):
        join_tensors([a, tensor_from_torch(torch.ones(2, 3, dtype=torch.float64))])
    with pytest.raises(InvalidRequestError, match="at least one"):
        join_tensors([])


# -- TensorSpec ---------------------------------------------------------------------------------

CODES = TensorSpec(dtypes=("int64", "int32"), shapes=(("T",), (1, "T")))


def zeros(dtype: str, shape: tuple[int, ...]) -> TensorData:
    return TensorData(dtype, shape, b"\0" * (itemsize(dtype) * int(np.prod(shape))))


@pytest.mark.parametrize(
    ("spec", "tensor"),
    [
        (CODES, zeros("int64", (7,))),
        (CODES, zeros("int32", (1, 7))),
        (CODES, zeros("int64", (0,))),
        (TensorSpec(shapes=((4, None, None),)), zeros("float64", (4, 2, 9))),
        (TensorSpec(dtypes=("float32",)), zeros("float32", (2, 3, 4, 5))),
        (TensorSpec(), zeros("uint8", ())),
    ],
)
def test_spec_accepts_matching_tensors(spec: TensorSpec, tensor: TensorData) -> None:
    spec.check(tensor)


@pytest.mark.parametrize(
    ("spec", "tensor", "words"),
    [
        (CODES, zeros("float32", (7,)), ["dtype not", "int64 or int32", "got float32, shape [7]"]),
        (CODES, zeros("int64", (2, 7)), ["shape not", "[T] or [1, T]", "got int64, shape [2, 7]"]),
        (CODES, zeros("int64", (1, 2, 7)), ["shape not", "[1, T]", "[1, 2, 7]"]),
        (CODES, zeros("int16", ()), ["dtype and shape not", "int16, shape []"]),
        (
            TensorSpec(shapes=((4, None, None),)),
            zeros("float32", (3, 8, 8)),
            ["any dtype, shape [4, *, *]", "got float32, shape [3, 8, 8]"],
        ),
    ],
)
def test_spec_names_expected_and_given(
    spec: TensorSpec, tensor: TensorData, words: list[str]
) -> None:
    with pytest.raises(InvalidRequestError) as info:
        spec.check(tensor)
    for word in words:
        assert word in str(info.value)


def test_a_required_tensor_must_be_there_and_an_optional_one_need_not() -> None:
    with pytest.raises(InvalidRequestError) as info:
        CODES.check(None, other_inputs=["prompt"])
    assert "takes a tensor input (int64 or int32, shape [T] or [1, T]); got prompt" in str(
        info.value
    )
    with pytest.raises(InvalidRequestError, match="got no input"):
        CODES.check(None)
    TensorSpec(dtypes=("int64",), required=False).check(None, other_inputs=["token_ids"])


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"dtypes": ("complex64",)}, ["complex64"]),
        ({"shapes": ((4, -1),)}, ["-1", "[4, -1]"]),
        ({"shapes": ((True,),)}, ["True"]),
        ({"shapes": ((2.5,),)}, ["2.5"]),
    ],
)
def test_a_malformed_spec_is_refused(kwargs: dict[str, object], words: list[str]) -> None:
    with pytest.raises(InvalidRequestError) as info:
        TensorSpec(**kwargs)  # type: ignore[arg-type]
    for word in words:
        assert word in str(info.value)
