"""The tensors file a bundle's head is stored in: written and read back, and its version
checked like every message's (an int, not a bool or a float that equals it)."""

from __future__ import annotations

import numpy as np
import pytest

from protocols import wire
from protocols.errors import DecodeError
from protocols.model_format import pack_tensors, unpack_tensors


def test_a_tensors_file_round_trips() -> None:
    arrays = {"0.weight": np.ones((3, 2), np.float32), "0.bias": np.arange(3, dtype=np.float32)}
    back = unpack_tensors(pack_tensors(arrays))
    assert set(back) == set(arrays)
    for name, array in arrays.items():
        np.testing.assert_array_equal(back[name], array)


@pytest.mark.parametrize("version", [True, 1.0, 2, "1", None])
def test_a_version_other_than_the_int_1_is_refused(version: object) -> None:
    fields = wire.unpack_map(pack_tensors({"w": np.zeros(2, np.float32)}))
    data = wire.pack_map({**fields, "v": version})
    with pytest.raises(DecodeError) as info:
        unpack_tensors(data)
    assert info.value.reason == "version"
