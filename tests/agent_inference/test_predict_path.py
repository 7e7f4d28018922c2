"""The runtime's predict path: plain and bound (I/O binding) runs answer alike, inputs kept
for feedback stay as they were, metrics lose no observation, threads do not share buffers."""

from __future__ import annotations

import dataclasses
import threading

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
import pytest

from agent.answer_graph import ANSWER_OUTPUTS, with_answer_outputs
from agent.errors import InferenceError
from agent.feedback import RecentInputs
from agent.inference_metrics import InferenceMetrics
from agent.predictions import Predictions, new_predictions
from agent.serving import BOUND_SIZES, InferenceRuntime
from cloud_coordinator.bundles import Bundle, logits
from protocols.model_format import MODEL_FILE
from tests.agent_inference.conftest import Bundles


def _runtime(bundle: Bundle, recent: int = 64) -> InferenceRuntime:
    rt = InferenceRuntime(InferenceMetrics(), RecentInputs(recent))
    assert rt.install(bundle.manifest, bundle.files[MODEL_FILE])
    return rt


def _expected(bundle: Bundle, features: npt.NDArray[np.float32]) -> tuple[list[int], list[float]]:
    out = logits(bundle.files[MODEL_FILE], features).astype(np.float64)
    top = out.max(axis=1, keepdims=True)
    probs = np.exp(out - top) / np.exp(out - top).sum(axis=1, keepdims=True)
    return out.argmax(axis=1).tolist(), probs.max(axis=1).tolist()


def _metric(text: str, name: str) -> float:
    line = next(line for line in text.splitlines() if line.startswith(name + " "))
    return float(line.split()[-1])


@pytest.mark.parametrize("rows", [1, 7, 64])
def test_every_call_answers_like_the_reference(bundles: Bundles, rows: int) -> None:
    rt = _runtime(bundles.v1)
    x = bundles.pixels[:rows].copy()
    classes, confidences = _expected(bundles.v1, x / np.float32(16))
    # the first batch of a size runs plainly, later ones through the thread's bound run
    answers = [rt.predict(x) for _ in range(4)]
    for answer in answers:
        assert answer.classes == classes
        assert answer.confidences == pytest.approx(confidences, rel=1e-5)
        assert not answer.single
    assert len({a.prediction_id for a in answers}) == 4


def test_a_single_sample_and_other_dtypes_take_the_checked_path(bundles: Bundles) -> None:
    rt = _runtime(bundles.v1)
    classes, confidences = _expected(bundles.v1, bundles.pixels[:3] / np.float32(16))
    for _ in range(3):
        one = rt.predict(bundles.pixels[2])
        assert one.single
        assert one.classes == [classes[2]]
        assert one.confidences[0] == pytest.approx(confidences[2], rel=1e-5)
        assert rt.predict(bundles.pixels[:3].astype(np.float64)).classes == classes
        assert rt.predict(bundles.pixels[:3].tolist()).classes == classes
        strided = np.asfortranarray(bundles.pixels[:3])
        assert rt.predict(strided).classes == classes


def test_scale_and_offset_are_applied_in_both_paths(bundles: Bundles) -> None:
    pre: dict[str, float | int | str | bool] = {"scale": 0.125, "offset": -0.5}
    manifest = dataclasses.replace(bundles.v1.manifest, version="v-pre", preprocessing=pre)
    rt = _runtime(Bundle(bundles.v1.files, manifest))
    x = bundles.pixels[:5].copy()
    features = x * np.float32(0.125) + np.float32(-0.5)
    classes, confidences = _expected(bundles.v1, features)
    for _ in range(3):
        answer = rt.predict(x)
        assert answer.classes == classes
        assert answer.confidences == pytest.approx(confidences, rel=1e-5)
        kept, _, version = rt.recent.get(answer.row_id(4))
        assert version == "v-pre"
        np.testing.assert_array_equal(kept, features[4])


def test_inputs_kept_for_feedback_do_not_change_afterwards(bundles: Bundles) -> None:
    rt = _runtime(bundles.v1)
    x = bundles.pixels[:8].copy()
    first = [rt.predict(x) for _ in range(3)]  # plain, then bound runs
    x[:] = 99.0  # the caller reuses its array
    for _ in range(3):
        rt.predict(bundles.pixels[100:108].copy())  # the bound input is overwritten
    for answer in first:
        kept, _, _ = rt.recent.get(answer.row_id(5))
        np.testing.assert_array_equal(kept, bundles.pixels[5] / np.float32(16))


def test_a_thread_binds_a_bounded_number_of_sizes(bundles: Bundles) -> None:
    rt = _runtime(bundles.v1)
    sizes = range(1, BOUND_SIZES + 6)
    for rows in sizes:
        answers = [rt.predict(bundles.pixels[:rows]).classes for _ in range(3)]
        assert answers[0] == answers[1] == answers[2]
    served = rt.serving
    assert served is not None
    runs = served.local.runs
    assert len(runs) == BOUND_SIZES
    assert all(run is not None and len(run.input) == rows for rows, run in runs.items())


def test_threads_get_their_own_answers(bundles: Bundles) -> None:
    rt = _runtime(bundles.v1, recent=4096)
    classes, _ = _expected(bundles.v1, bundles.pixels[:400] / np.float32(16))
    errors: list[str] = []

    def load(i: int) -> None:
        for k in range(150):
            start = (i * 37 + k) % 336
            rows = 1 + (k % 3) * 31  # 1, 32 or 63 rows: each size bound on each thread
            answer = rt.predict(bundles.pixels[start : start + rows])
            if answer.classes != classes[start : start + rows]:
                errors.append(f"thread {i} call {k}")

    threads = [threading.Thread(target=load, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    text = rt.metrics.render()
    assert 'fedge_agent_predict_requests_total{outcome="ok"} 600' in text
    assert _metric(text, "fedge_agent_predictions_total") == 4 * 50 * (1 + 32 + 63)
    assert _metric(text, "fedge_agent_prediction_confidence_count") == 4 * 50 * 96
    assert _metric(text, "fedge_agent_predict_latency_seconds_count") == 600


def _observe_two(metrics: InferenceMetrics, api: str) -> None:
    """A single-row request and one of three rows, through `api`."""
    if api == "observe":  # the fast path's: confidences as the list the answer holds
        metrics.observe(0.0003, [0.55])
        metrics.observe(0.002, [0.15, 1.0, 0.95])
    else:
        metrics.observe_one(0.0003, 0.55)
        metrics.observe_batch(0.002, np.asarray([0.15, 1.0, 0.95], dtype=np.float32))


@pytest.mark.parametrize("api", ["observe", "observe_one_and_batch"])
def test_metrics_fold_pending_observations_exactly(api: str) -> None:
    metrics = InferenceMetrics()
    n = InferenceMetrics.FOLD + 10  # one fold on the way, the rest when read
    for i in range(n):
        _observe_two(metrics, api)
        if i == 5:
            assert metrics.snapshot()["inference_rows"] == 24
    text = metrics.render()
    assert f'fedge_agent_predict_requests_total{{outcome="ok"}} {2 * n}' in text
    assert _metric(text, "fedge_agent_predictions_total") == 4 * n
    assert f'fedge_agent_predict_latency_seconds_bucket{{le="0.0005"}} {n}' in text
    assert f'fedge_agent_predict_latency_seconds_bucket{{le="0.0025"}} {2 * n}' in text
    assert f'fedge_agent_prediction_confidence_bucket{{le="0.2"}} {n}' in text
    assert f'fedge_agent_prediction_confidence_bucket{{le="0.6"}} {2 * n}' in text
    assert f'fedge_agent_prediction_confidence_bucket{{le="0.95"}} {3 * n}' in text
    assert f'fedge_agent_prediction_confidence_bucket{{le="1.0"}} {4 * n}' in text
    snap = metrics.snapshot()
    assert snap["inference_ok"] == 2 * n
    assert snap["inference_confidence_mean"] == pytest.approx((0.55 + 0.15 + 1.0 + 0.95) / 4)
    assert snap["inference_latency_mean_ms"] == pytest.approx((0.3 + 2.0) / 2)


def test_concurrent_observations_are_all_counted() -> None:
    metrics = InferenceMetrics()

    def observe() -> None:
        for _ in range(3000):
            metrics.observe_one(0.001, 0.5)
            metrics.observe_batch(0.001, np.full(2, 0.5, dtype=np.float32))

    threads = [threading.Thread(target=observe) for _ in range(4)]
    for t in threads:
        t.start()
    for _ in range(20):
        metrics.render()  # folds race with the observers
    for t in threads:
        t.join()
    snap = metrics.snapshot()
    assert snap["inference_ok"] == 4 * 6000
    assert snap["inference_rows"] == 4 * 9000


def test_the_fast_constructor_builds_an_ordinary_answer() -> None:
    args = ("abc-1", "m", "v1", [3], [0.9], ("a", "b", "c", "d"), True)
    fast = new_predictions(*args)
    assert fast == Predictions(*args)
    assert type(fast) is Predictions
    assert fast.labels == ["d"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        fast.model = "other"  # type: ignore[misc]


def _tiny_model(opset: int, elem_type: int) -> bytes:
    """y = Relu(x) (float) or Identity (other types): one input, one output, shape (N, 4)."""
    op = "Relu" if elem_type == onnx.TensorProto.FLOAT else "Identity"
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node(op, ["x"], ["y"])],
        "tiny",
        [onnx.helper.make_tensor_value_info("x", elem_type, ["n", 4])],
        [onnx.helper.make_tensor_value_info("y", elem_type, ["n", 4])],
    )
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])
    model.ir_version = 8
    return bytes(model.SerializeToString())


def test_the_answer_nodes_make_a_valid_model_that_agrees(bundles: Bundles) -> None:
    data = bundles.v1.files[MODEL_FILE]
    answered = with_answer_outputs(data)
    assert answered is not None
    assert answered.startswith(data)  # the original bytes stay as they are
    model = onnx.load_from_string(answered)
    onnx.checker.check_model(model, full_check=True)
    assert [o.name for o in model.graph.output] == ["logits", *ANSWER_OUTPUTS]
    session = ort.InferenceSession(answered, providers=["CPUExecutionProvider"])
    x = bundles.pixels[:50] / np.float32(16)
    out, conf, cls = session.run(None, {"input": x})
    classes, confidences = _expected(bundles.v1, x)
    assert cls.ravel().tolist() == classes == out.argmax(axis=1).tolist()
    assert conf.ravel() == pytest.approx(confidences, rel=1e-5)


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"", "empty"),
        (b"\x0a\xff\xff\xff\xff\x0f", "truncated"),
        (b"\x0f\x00", "bad wire type"),
        (_tiny_model(12, onnx.TensorProto.FLOAT), "opset 12"),
        (_tiny_model(17, onnx.TensorProto.INT64), "integer output"),
    ],
)
def test_models_that_cannot_take_the_answer_nodes_are_left_alone(data: bytes, why: str) -> None:
    assert with_answer_outputs(data) is None, why


def test_a_model_with_answer_nodes_added_to_a_recent_opset_loads() -> None:
    answered = with_answer_outputs(_tiny_model(17, onnx.TensorProto.FLOAT))
    assert answered is not None
    session = ort.InferenceSession(answered, providers=["CPUExecutionProvider"])
    x = np.asarray([[0.5, 3.0, -1.0, 2.0]], dtype=np.float32)
    _, conf, cls = session.run(None, {"x": x})
    assert cls.tolist() == [[1]]
    assert conf.item() == pytest.approx(np.exp(3.0) / np.exp([0.5, 3.0, 0.0, 2.0]).sum())


def test_without_answer_nodes_the_runtime_answers_itself(
    bundles: Bundles, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert _runtime(bundles.v1).serving.answers == ANSWER_OUTPUTS  # type: ignore[union-attr]
    monkeypatch.setattr("agent.version_slots.with_answer_outputs", lambda data: b"not a model")
    rt = _runtime(bundles.v1)  # the appended model fails to load: the original one serves
    served = rt.serving
    assert served is not None
    assert served.answers == ()
    x = bundles.pixels[:9].copy()
    classes, confidences = _expected(bundles.v1, x / np.float32(16))
    for rows in (1, 9):
        for _ in range(3):
            answer = rt.predict(x[:rows])
            assert answer.classes == classes[:rows]
            assert answer.confidences == pytest.approx(confidences[:rows], rel=1e-5)
    assert all(not run.extra for run in served.local.runs.values() if run is not None)


def test_a_failing_run_on_the_short_path_is_an_inference_error_and_counted(
    bundles: Bundles,
) -> None:
    rt = _runtime(bundles.v1)
    x = bundles.pixels[:4].copy()
    for _ in range(3):  # plain, then bound: the shape now takes the short path
        rt.predict(x)
    served = rt.serving
    assert served is not None
    run = served.local.answering[x.shape]

    def fail() -> None:
        raise RuntimeError("simulated onnxruntime failure")

    run.launch = fail
    with pytest.raises(InferenceError, match="simulated onnxruntime failure"):
        rt.predict(x)
    assert 'fedge_agent_predict_requests_total{outcome="error"} 1' in rt.metrics.render()
