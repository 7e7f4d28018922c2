"""The int8 variant: a real quantised ONNX model, scored on the holdout, chosen by rule."""

from __future__ import annotations

import numpy as np
import pytest

from cloud_coordinator import bundles, datasets
from cloud_coordinator.templates import get_template
from cloud_coordinator.variants import INT8_FILE, MAX_DROP_POINTS, choose_serving
from protocols.model_format import MODEL_FILE


@pytest.fixture(scope="module")
def trained() -> tuple[bundles.Bundle, datasets.Samples, float]:
    """A digits MLP version whose head was trained a little (so accuracy is meaningful)."""
    from agent.train_worker import train_head

    template = get_template("digits_mlp")
    start, _ = bundles.initial_bundle(template, "var-m", "var.r0", 0)
    server = datasets.server_data(template, 0)
    pool = datasets.device_pool(template, 0)
    x, y = pool.x, pool.y
    out = train_head({"features": x.reshape(len(x), -1), "labels": y, "head": start.head_state(),
                      "layers": template.head_layers, "epochs": 3, "batch_size": 32, "lr": 0.05,
                      "momentum": 0.9, "seed": 0, "threads": 1})  # fmt: skip
    bundle = bundles.next_bundle(start, out["head"], "var.r1")
    accuracy, _ = bundles.evaluate(bundle.files[MODEL_FILE], server.holdout.x, server.holdout.y)
    return bundle, server.holdout, accuracy


def test_int8_is_served_when_within_a_point(
    trained: tuple[bundles.Bundle, datasets.Samples, float],
) -> None:
    bundle, holdout, accuracy = trained
    assert accuracy > 0.8
    chosen = choose_serving(bundle, holdout.x, holdout.y, accuracy)
    assert INT8_FILE in chosen.files
    assert {f.name for f in chosen.manifest.files} == set(chosen.files)
    assert len(chosen.files[INT8_FILE]) < len(chosen.files[MODEL_FILE]) / 2
    v = chosen.manifest.variants
    assert v["fp32_accuracy"] == accuracy
    int8_acc, _ = bundles.evaluate(chosen.files[INT8_FILE], holdout.x, holdout.y)
    assert v["int8_accuracy"] == int8_acc
    assert abs(int8_acc - accuracy) * 100 <= MAX_DROP_POINTS  # this model quantises well
    assert (v["chosen"], chosen.manifest.serving) == ("int8", INT8_FILE)
    assert "within" in str(v["reason"])
    fp32 = bundles.logits(chosen.files[MODEL_FILE], holdout.x)
    int8 = bundles.logits(chosen.files[INT8_FILE], holdout.x)
    assert np.mean(fp32.argmax(1) == int8.argmax(1)) > 0.95


def test_fp32_is_kept_when_int8_loses_more_than_a_point(
    trained: tuple[bundles.Bundle, datasets.Samples, float],
) -> None:
    bundle, holdout, accuracy = trained
    # As if fp32 scored 2 points more than it does: int8 now trails by more than one.
    chosen = choose_serving(bundle, holdout.x, holdout.y, accuracy + 0.02 + 1e-9)
    assert chosen.manifest.variants["chosen"] == "fp32"
    assert chosen.manifest.serving == MODEL_FILE
    assert "more than" in str(chosen.manifest.variants["reason"])
    assert INT8_FILE in chosen.files  # kept for the record, not served


def test_disabled_drops_a_stale_variant(
    trained: tuple[bundles.Bundle, datasets.Samples, float],
) -> None:
    bundle, holdout, accuracy = trained
    with_variant = choose_serving(bundle, holdout.x, holdout.y, accuracy)
    # the next version starts as a copy of this one; with the variant off it must not
    # carry the old int8 file along
    plain = choose_serving(with_variant, holdout.x, holdout.y, accuracy, enabled=False)
    assert INT8_FILE not in plain.files
    assert (plain.manifest.serving_file, plain.manifest.variants) == ("", {})
    assert plain.manifest.serving == MODEL_FILE
