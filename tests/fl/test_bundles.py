"""Bundles: export, rewrite without re-export, manifests, evaluation; checked against torch."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper

from cloud_coordinator import bundles, datasets
from cloud_coordinator.bundles import Bundle, evaluate, initial_bundle, next_bundle
from cloud_coordinator.model_registry import ModelRegistry
from cloud_coordinator.templates import FusedModel, Standardize, Template, get_template
from protocols.model_format import (
    BACKBONE_FILE,
    HEAD_FILE,
    MODEL_FILE,
    LayerSpec,
    head_shapes,
    unpack_tensors,
)

ROOT = Path(__file__).resolve().parents[2]
HeadState = dict[str, np.ndarray]

# A template small enough to export quickly, with a backbone (a fitted standardizer).
TINY = Template(
    name="tiny",
    dataset="breast_cancer",
    input_shape=(6,),
    num_classes=3,
    labels=("a", "b", "c"),
    head_layers=(LayerSpec("linear", 6, 5), LayerSpec("relu"), LayerSpec("linear", 5, 3)),
    preprocessing={"scale": 1.0, "offset": 0.0},
    backbone="standardize",
    server_fraction=0.1,
)


def torch_logits(
    template: Template, backbone: torch.nn.Module | None, state: HeadState, x: np.ndarray
) -> np.ndarray:
    head = template.build_head()
    head.load_state_dict({k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in state.items()})
    with torch.no_grad():
        out: np.ndarray = FusedModel(backbone, head).eval()(torch.from_numpy(x)).numpy()
    return out


def perturbed(state: HeadState, seed: int) -> HeadState:
    """Every parameter moved by noise as large as its spread (logits stay near 1)."""
    rng = np.random.default_rng(seed)
    return {
        k: (v + rng.normal(0.0, float(v.std()), v.shape)).astype(np.float32)
        for k, v in state.items()
    }


@pytest.fixture(scope="module")
def mlp() -> tuple[Bundle, HeadState]:
    return initial_bundle(get_template("digits_mlp"), "digits", "v1", seed=0, created=100.0)


@pytest.fixture(scope="module")
def tiny() -> tuple[Bundle, HeadState, torch.nn.Module]:
    backbone = TINY.build_backbone()
    assert isinstance(backbone, Standardize)
    backbone.fit(np.random.default_rng(0).normal(3.0, 2.0, (40, 6)))
    bundle, state = initial_bundle(TINY, "tiny", "v1", seed=0, backbone=backbone)
    return bundle, state, backbone


def inputs(template: Template, n: int = 37, seed: int = 0) -> np.ndarray:
    shape = (n, *template.input_shape)
    return np.random.default_rng(seed).normal(1.0, 2.0, shape).astype(np.float32)


def test_the_initial_mlp_bundle_runs_in_onnxruntime_like_torch(
    mlp: tuple[Bundle, HeadState],
) -> None:
    bundle, state = mlp
    template = get_template("digits_mlp")
    assert set(bundle.files) == {MODEL_FILE, HEAD_FILE}, "cut at the input: no backbone file"
    x = inputs(template)
    np.testing.assert_allclose(
        bundles.logits(bundle.files[MODEL_FILE], x),
        torch_logits(template, None, state, x),
        atol=1e-5,
    )
    fresh = template.build_head(0).state_dict()
    assert all(np.array_equal(state[k], v.numpy()) for k, v in fresh.items())


def test_head_tensors_hold_the_head_in_torch_order(mlp: tuple[Bundle, HeadState]) -> None:
    bundle, state = mlp
    stored = unpack_tensors(bundle.files[HEAD_FILE])
    shapes = head_shapes(get_template("digits_mlp").head_layers)
    assert list(stored) == list(shapes)
    assert {k: v.shape for k, v in stored.items()} == shapes
    assert all(np.array_equal(stored[k], state[k]) for k in shapes)


def test_the_manifest_describes_the_files(mlp: tuple[Bundle, HeadState]) -> None:
    bundle, _ = mlp
    manifest = bundle.manifest
    template = get_template("digits_mlp")
    assert (manifest.name, manifest.version, manifest.parent_version) == ("digits", "v1", None)
    assert manifest.created == 100.0
    assert {e.name: (e.sha256, e.size) for e in manifest.files} == {
        name: (hashlib.sha256(data).hexdigest(), len(data)) for name, data in bundle.files.items()
    }
    assert [(s.name, s.dtype, s.shape) for s in manifest.inputs] == [("input", "float32", (-1, 64))]
    assert [(s.name, s.shape) for s in manifest.outputs] == [("logits", (-1, 10))]
    assert manifest.labels == template.labels
    assert manifest.head_layers == template.head_layers
    assert manifest.preprocessing == {"scale": 0.0625, "offset": 0.0}
    model = onnx.load_from_string(bundle.files[MODEL_FILE])
    onnx.checker.check_model(model)
    batch = model.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_param, "the batch dimension is dynamic"


def test_a_backbone_bundle_splits_and_fuses_consistently(
    tiny: tuple[Bundle, HeadState, torch.nn.Module],
) -> None:
    bundle, state, backbone = tiny
    assert set(bundle.files) == {BACKBONE_FILE, MODEL_FILE, HEAD_FILE}
    x = inputs(TINY, seed=1)
    expected = torch_logits(TINY, backbone, state, x)
    np.testing.assert_allclose(bundles.logits(bundle.files[MODEL_FILE], x), expected, atol=1e-5)
    runner = bundles.session(bundle.files[BACKBONE_FILE])
    (features,) = runner.run(["features"], {"input": x})
    with torch.no_grad():
        np.testing.assert_allclose(features, backbone(torch.from_numpy(x)).numpy(), atol=1e-5)
        head_only = torch_logits(TINY, None, state, np.asarray(features, np.float32))
    np.testing.assert_allclose(head_only, expected, atol=1e-5)


def test_a_backbone_must_be_given_exactly_when_the_template_has_one() -> None:
    with pytest.raises(ValueError, match="pass a fitted one"):
        initial_bundle(TINY, "tiny", "v1", seed=0)
    with pytest.raises(ValueError, match="takes no backbone"):
        initial_bundle(get_template("digits_mlp"), "m", "v1", 0, backbone=torch.nn.Identity())


def test_next_bundle_rewrites_the_head_without_exporting(
    tiny: tuple[Bundle, HeadState, torch.nn.Module], monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle, state, backbone = tiny

    def no_export(*args: object, **kwargs: object) -> bytes:
        raise AssertionError("next_bundle must not export")

    monkeypatch.setattr(bundles, "export_onnx", no_export)
    new_state = perturbed(state, 1)
    second = next_bundle(bundle, new_state, "v2", created=200.0)
    x = inputs(TINY, seed=2)
    np.testing.assert_allclose(
        bundles.logits(second.files[MODEL_FILE], x),
        torch_logits(TINY, backbone, new_state, x),
        atol=1e-5,
    )
    assert second.files[BACKBONE_FILE] == bundle.files[BACKBONE_FILE]
    assert all(np.array_equal(second.head_state()[k], new_state[k]) for k in state)
    manifest = second.manifest
    assert (manifest.version, manifest.parent_version, manifest.created) == ("v2", "v1", 200.0)
    assert {e.name: e.sha256 for e in manifest.files} == {
        name: hashlib.sha256(data).hexdigest() for name, data in second.files.items()
    }
    assert manifest.head_layers == TINY.head_layers
    third = next_bundle(second, perturbed(state, 2), "v3", parent_version="v1")
    assert third.manifest.parent_version == "v1"
    assert bundle.head_state().keys() == state.keys(), "the previous bundle is untouched"


def test_next_bundle_on_the_big_mlp_matches_torch(mlp: tuple[Bundle, HeadState]) -> None:
    bundle, state = mlp
    template = get_template("digits_mlp")
    new_state = perturbed(state, 3)
    second = next_bundle(bundle, new_state, "v2")
    x = inputs(template, n=5, seed=3)
    got = bundles.logits(second.files[MODEL_FILE], x)
    np.testing.assert_allclose(got, torch_logits(template, None, new_state, x), atol=1e-5)
    assert np.abs(got - bundles.logits(bundle.files[MODEL_FILE], x)).max() > 0.1


def as_matmul(model_bytes: bytes) -> bytes:
    """The same model with every Gemm turned into MatMul (weight stored transposed) + Add."""
    model = onnx.load_from_string(model_bytes)
    inits = {i.name: i for i in model.graph.initializer}
    nodes = []
    for node in model.graph.node:
        if node.op_type != "Gemm":
            nodes.append(node)
            continue
        x, w, b = node.input
        weight: np.ndarray = numpy_helper.to_array(inits[w])
        inits[w].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(weight.T), w))
        product = node.output[0] + "_matmul"
        nodes.append(helper.make_node("MatMul", [x, w], [product]))
        nodes.append(helper.make_node("Add", [product, b], list(node.output)))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    data: bytes = model.SerializeToString()
    return data


def test_next_bundle_writes_matmul_weights_transposed(
    tiny: tuple[Bundle, HeadState, torch.nn.Module],
) -> None:
    bundle, state, backbone = tiny
    files = dict(bundle.files)
    files[MODEL_FILE] = as_matmul(files[MODEL_FILE])
    graph = onnx.load_from_string(files[MODEL_FILE]).graph
    assert [n.op_type for n in graph.node].count("MatMul") == 2
    x = inputs(TINY, seed=4)
    np.testing.assert_allclose(
        bundles.logits(files[MODEL_FILE], x), torch_logits(TINY, backbone, state, x), atol=1e-5
    )
    new_state = perturbed(state, 4)
    second = next_bundle(Bundle(files, bundle.manifest), new_state, "v2")
    np.testing.assert_allclose(
        bundles.logits(second.files[MODEL_FILE], x),
        torch_logits(TINY, backbone, new_state, x),
        atol=1e-5,
    )


def test_next_bundle_refuses_a_head_of_another_shape(
    tiny: tuple[Bundle, HeadState, torch.nn.Module],
) -> None:
    bundle, state, _ = tiny
    wrong = dict(state)
    wrong["2.bias"] = np.zeros(4, np.float32)
    with pytest.raises(ValueError, match="does not match"):
        next_bundle(bundle, wrong, "v2")
    missing = {k: v for k, v in state.items() if k != "0.bias"}
    with pytest.raises(ValueError, match="does not match"):
        next_bundle(bundle, missing, "v2")


def test_evaluate_matches_a_direct_computation(
    tiny: tuple[Bundle, HeadState, torch.nn.Module],
) -> None:
    bundle, state, backbone = tiny
    x = inputs(TINY, n=1500, seed=5)  # more than one onnxruntime batch
    scores = torch.from_numpy(torch_logits(TINY, backbone, state, x)).double()
    y = np.random.default_rng(5).integers(0, 3, len(x))
    y[:500] = scores[:500].argmax(dim=1).numpy()
    accuracy, loss = evaluate(bundle.files[MODEL_FILE], x, y)
    expected_loss = torch.nn.functional.cross_entropy(scores, torch.from_numpy(y)).item()
    expected_accuracy = float((scores.argmax(dim=1).numpy() == y).mean())
    assert accuracy == pytest.approx(expected_accuracy, abs=1e-12)
    assert loss == pytest.approx(expected_loss, rel=1e-5)
    with pytest.raises(ValueError, match="at least one"):
        evaluate(bundle.files[MODEL_FILE], x[:0], y[:0])


def test_a_bundle_round_trips_through_the_model_registry(
    tiny: tuple[Bundle, HeadState, torch.nn.Module], tmp_path: Path
) -> None:
    bundle, state, _ = tiny
    with ModelRegistry(tmp_path) as registry:
        registry.put(bundle, metrics={"accuracy": 0.5})
        second = next_bundle(bundle, perturbed(state, 6), "v2")
        registry.put(second, job_id="job-1", round=1, devices=("agent-01",))
    with ModelRegistry(tmp_path) as registry:
        stored = Bundle(registry.files("tiny", "v2"), registry.manifest("tiny", "v2"))
    assert stored == second
    assert stored.files[BACKBONE_FILE] == bundle.files[BACKBONE_FILE]


def test_initial_bundle_evaluates_to_chance_and_training_helps(
    mlp: tuple[Bundle, HeadState],
) -> None:
    template = get_template("digits_mlp")
    holdout = datasets.server_data(template, 0).holdout
    accuracy, loss = evaluate(mlp[0].files[MODEL_FILE], holdout.x, holdout.y)
    assert accuracy < 0.4
    assert loss == pytest.approx(np.log(10), rel=0.1)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["digits_cnn", "machine_health"])
def test_exporting_in_a_fresh_interpreter_is_silent(name: str) -> None:
    code = (
        "from cloud_coordinator.baseline import server_backbone\n"
        "from cloud_coordinator.bundles import initial_bundle\n"
        "from cloud_coordinator.templates import get_template\n"
        f"template = get_template({name!r})\n"
        "backbone = server_backbone(template, 0)\n"
        "bundle, _ = initial_bundle(template, 'm', 'v1', 0, backbone=backbone)\n"
        "assert len(bundle.files) == 3\n"
    )
    done = subprocess.run(
        [sys.executable, "-W", "error", "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=110,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    assert done.stderr == ""
