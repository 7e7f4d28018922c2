"""The runtime on real exported models: predictions, schema validation, swaps, rollback."""

from __future__ import annotations

import dataclasses
import threading

import numpy as np
import pytest

from agent.feedback import RecentInputs
from agent.inference_metrics import InferenceMetrics
from agent.onnx_runtime import InputError, OnnxModel, choose_providers
from agent.rollout import VersionState
from agent.serving import InferenceRuntime, ModelUnavailableError
from cloud_coordinator.bundles import logits
from protocols.model_format import MODEL_FILE
from tests.agent_inference.conftest import Bundles, broken


def _runtime() -> InferenceRuntime:
    return InferenceRuntime(InferenceMetrics(), RecentInputs(64))


def _install(rt: InferenceRuntime, bundle: object) -> bool:
    return rt.install(bundle.manifest, bundle.files[MODEL_FILE])  # type: ignore[attr-defined]


def test_predictions_match_the_coordinators_evaluation(bundles: Bundles) -> None:
    rt = _runtime()
    assert _install(rt, bundles.v1)
    pixels = bundles.pixels[:64]
    expected = logits(bundles.v1.files[MODEL_FILE], pixels / 16.0).argmax(axis=1)
    batch = rt.predict(pixels)  # raw pixels: the manifest's scale (1/16) is applied
    assert batch.classes == expected.tolist()
    assert not batch.single
    assert len(batch.confidences) == 64
    assert all(0.1 <= c <= 1.0 for c in batch.confidences)
    one = rt.predict(pixels[3])
    assert one.single
    assert one.classes == [int(expected[3])]
    assert one.labels == [str(int(expected[3]))]
    assert one.version == "v1"
    assert one.model == "digits-mlp"
    assert one.confidences[0] == pytest.approx(batch.confidences[3], rel=1e-5)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (np.zeros((2, 63), np.float32), r"shape \(N, 64\), got \(2, 63\)"),
        (np.zeros((2, 8, 8), np.float32), r"shape \(N, 64\), got \(2, 8, 8\)"),
        (np.zeros((0, 64), np.float32), r"got \(0, 64\)"),
        (np.array([["a"] * 64]), "must be float32, got <U1"),
        (np.zeros((1, 64), np.complex64), "must be float32, got complex64"),
        ([[1.0, 2.0], [3.0]], "not a numeric array"),
    ],
)
def test_a_wrong_input_is_refused_with_what_is_wrong(
    bundles: Bundles, value: object, message: str
) -> None:
    rt = _runtime()
    _install(rt, bundles.v1)
    with pytest.raises(InputError, match=message):
        rt.predict(value)
    assert "invalid" in rt.metrics.render()


def test_integers_and_doubles_are_accepted_as_floats(bundles: Bundles) -> None:
    rt = _runtime()
    _install(rt, bundles.v1)
    a = rt.predict(bundles.pixels[:2].astype(np.int64))
    b = rt.predict(bundles.pixels[:2].astype(np.float64))
    assert a.classes == b.classes


def test_no_model_is_unavailable() -> None:
    with pytest.raises(ModelUnavailableError):
        _runtime().predict(np.zeros((1, 64)))


def test_a_model_that_fails_to_load_is_not_swapped_in(bundles: Bundles) -> None:
    rt = _runtime()
    assert _install(rt, bundles.v1)
    bad = broken(bundles.v1, "v-bad", b"not an onnx model")
    assert not _install(rt, bad)
    assert rt.serving is not None
    assert rt.serving.version == "v1"
    assert rt.last_failure["reason"] == "load"
    assert rt.versions.state("v-bad") is VersionState.FAILED
    assert 'fedge_agent_model_load_failures_total{reason="load"} 1' in rt.metrics.render()
    assert rt.predict(bundles.pixels[0]).version == "v1"


def test_a_version_that_failed_before_can_fail_again_without_loading(bundles: Bundles) -> None:
    rt = _runtime()
    assert _install(rt, bundles.v1)
    bad = broken(bundles.v1, "v-bad", b"not an onnx model")
    assert not _install(rt, bad)
    rt.fail(bad.manifest, "missing", "blob evicted")  # redeployed; its file gone this time
    assert rt.versions.state("v-bad") is VersionState.FAILED
    assert rt.last_failure["reason"] == "missing"
    rt.fail(bundles.v1.manifest, "missing", "a redeploy of the served version")
    assert rt.serving is not None
    assert rt.serving.version == "v1"  # recorded, not unloaded


def test_a_model_whose_input_differs_from_its_manifest_is_refused(bundles: Bundles) -> None:
    rt = _runtime()
    _install(rt, bundles.v1)
    other = broken(bundles.v1, "v-other", bundles.v1.files[MODEL_FILE])
    spec = other.manifest.inputs[0]
    wrong = type(spec)(spec.name, spec.dtype, (-1, 65))
    manifest = dataclasses.replace(other.manifest, inputs=(wrong,))
    assert not rt.install(manifest, other.files[MODEL_FILE])
    assert rt.last_failure["reason"] == "schema"
    assert rt.serving is not None
    assert rt.serving.version == "v1"


def test_swap_keeps_the_previous_version_and_rollback_returns_to_it(bundles: Bundles) -> None:
    rt = _runtime()
    _install(rt, bundles.v1)
    _install(rt, bundles.v2)
    assert (rt.serving and rt.serving.version, rt.standby and rt.standby.version) == ("v2", "v1")
    assert rt.predict(bundles.pixels[0]).version == "v2"
    rt.rollback()
    assert rt.predict(bundles.pixels[0]).version == "v1"
    assert rt.versions.as_dict() == {"v1": "serving", "v2": "rolled_back"}
    with pytest.raises(ModelUnavailableError, match="no previous version"):
        rt.rollback()
    text = rt.metrics.render()
    assert 'model_info{model="digits-mlp",version="v1",role="serving"} 1' in text
    assert "fedge_agent_model_rollbacks_total 1" in text


def test_a_rollback_does_not_wait_for_a_version_loading(bundles: Bundles) -> None:
    # A rollback comes as an MQTT command, on the client's network thread: were it to wait
    # for a load (seconds for a large model), the connection's keepalive would lapse.
    rt = _runtime()
    _install(rt, bundles.v1)
    _install(rt, bundles.v2)
    loading, release = threading.Event(), threading.Event()
    real_load = rt.load

    def slow_load(manifest: object, model_bytes: bytes) -> object:
        loading.set()
        assert release.wait(60)
        return real_load(manifest, model_bytes)  # type: ignore[arg-type]

    rt.load = slow_load  # type: ignore[assignment,method-assign]
    v3 = bundles.version(bundles.v1, "v3", 3)
    installer = threading.Thread(target=_install, args=(rt, v3))
    installer.start()
    try:
        assert loading.wait(60)
        rolled_back = threading.Event()

        def roll_back() -> None:
            rt.rollback()
            rolled_back.set()

        threading.Thread(target=roll_back).start()
        assert rolled_back.wait(30), "the rollback waited for the load"
        assert rt.serving is not None
        assert rt.serving.version == "v1"
        assert rt.versions.as_dict() == {"v1": "serving", "v2": "rolled_back", "v3": "loading"}
    finally:
        release.set()
        installer.join(60)
    assert (rt.serving and rt.serving.version, rt.standby and rt.standby.version) == ("v3", "v1")
    assert rt.predict(bundles.pixels[0]).version == "v3"


def test_swaps_under_concurrent_predictions_fail_no_request(bundles: Bundles) -> None:
    rt = _runtime()
    _install(rt, bundles.v1)
    versions = [bundles.v1, bundles.v2, bundles.version(bundles.v1, "v3", 3)]
    stop = threading.Event()
    seen: set[str] = set()
    errors: list[BaseException] = []
    counts = [0] * 4

    def load(i: int) -> None:
        x = bundles.pixels[i : i + 1 + i]
        while not stop.is_set():
            try:
                seen.add(rt.predict(x).version)
                counts[i] += 1
            except BaseException as exc:
                errors.append(exc)

    threads = [threading.Thread(target=load, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for k in range(12):
        assert _install(rt, versions[k % 3])
    stop.set()
    for t in threads:
        t.join()
    assert not errors
    assert sum(counts) > 0
    assert seen <= {"v1", "v2", "v3"}


def test_providers_fall_back_to_cpu_and_report_the_missing_ones() -> None:
    chosen, missing = choose_providers(["cuda", "tensorrt", "cpu"])
    assert chosen[-1] == "CPUExecutionProvider"
    assert "CUDAExecutionProvider" in missing or "CUDAExecutionProvider" in chosen
    assert choose_providers([])[0] == ["CPUExecutionProvider"]


def test_the_session_runs_with_explicit_threads(bundles: Bundles) -> None:
    model = OnnxModel.from_bytes(bundles.v1.files[MODEL_FILE], threads=2)
    assert model.providers == ["CPUExecutionProvider"]
    out = model.run_checked(model.check(np.zeros((3, 64), np.float32)))
    assert out.shape == (3, 10)
