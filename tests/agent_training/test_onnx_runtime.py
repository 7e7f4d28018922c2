"""The onnxruntime adapter on a tiny model built with onnx.helper: run, metadata, errors."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from agent.errors import AgentError
from agent.onnx_runtime import InferenceError, OnnxModel

WEIGHT = (np.arange(12, dtype=np.float32).reshape(4, 3) - 4.0) / 10.0
BIAS = np.array([-1.0, 0.0, 1.0], dtype=np.float32)


def _tiny_model(batch: str | int = "batch") -> bytes:
    """relu(x @ WEIGHT + BIAS) for x of shape (batch, 4)."""
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["h"]),
            helper.make_node("Add", ["h", "B"], ["z"]),
            helper.make_node("Relu", ["z"], ["y"]),
        ],
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 3])],
        [numpy_helper.from_array(WEIGHT, "W"), numpy_helper.from_array(BIAS, "B")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    data: bytes = model.SerializeToString()
    return data


def _expected(x: np.ndarray) -> np.ndarray:
    return np.maximum(x.astype(np.float32) @ WEIGHT + BIAS, 0.0)


def test_runs_the_first_output() -> None:
    model = OnnxModel.from_bytes(_tiny_model(), threads=2)
    x = np.random.default_rng(0).standard_normal((5, 4))
    out = model.run(x)  # float64 in: cast to the model's float32
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, _expected(x), rtol=1e-6, atol=1e-6)


def test_describes_its_input() -> None:
    model = OnnxModel.from_bytes(_tiny_model())
    assert model.input_name == "x"
    assert model.input_shape == (None, 4)
    assert model.input_dtype == np.float32
    assert model.providers == ["CPUExecutionProvider"]


def test_a_fixed_batch_model_is_warmed_up_with_its_own_shape() -> None:
    model = OnnxModel.from_bytes(_tiny_model(batch=2))
    assert model.input_shape == (2, 4)
    assert model.run(np.ones((2, 4))).shape == (2, 3)


def test_unavailable_providers_are_skipped() -> None:
    model = OnnxModel.from_bytes(
        _tiny_model(), providers=("NoSuchExecutionProvider", "CPUExecutionProvider")
    )
    assert model.providers == ["CPUExecutionProvider"]


def test_no_usable_provider_is_an_error() -> None:
    with pytest.raises(InferenceError, match="none of the providers"):
        OnnxModel.from_bytes(_tiny_model(), providers=("NoSuchExecutionProvider",))


def test_garbage_bytes_raise_an_agent_error_with_the_cause() -> None:
    with pytest.raises(InferenceError, match="cannot load") as info:
        OnnxModel.from_bytes(b"this is not an onnx model")
    assert isinstance(info.value, AgentError)
    assert info.value.__cause__ is not None
    assert type(info.value.__cause__).__module__.startswith("onnxruntime")


def test_a_wrong_input_shape_raises_an_inference_error() -> None:
    model = OnnxModel.from_bytes(_tiny_model())
    with pytest.raises(InferenceError, match=r"\(2, 5\)") as info:
        model.run(np.ones((2, 5), dtype=np.float32))
    assert info.value.__cause__ is not None


def test_threads_must_be_positive() -> None:
    with pytest.raises(InferenceError, match="threads"):
        OnnxModel.from_bytes(_tiny_model(), threads=0)
