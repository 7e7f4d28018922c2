"""Templates (head and backbone shapes, seeding) and the centralized baseline."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cloud_coordinator import baseline, datasets
from cloud_coordinator.templates import (
    TEMPLATES,
    Standardize,
    Template,
    get_template,
    template_names,
)
from protocols.model_format import LayerSpec, head_shapes


@pytest.mark.parametrize("name", template_names())
def test_the_head_has_exactly_the_shared_format_shapes(name: str) -> None:
    template = get_template(name)
    head = template.build_head(seed=3)
    shapes = {k: tuple(v.shape) for k, v in head.state_dict().items()}
    assert shapes == head_shapes(template.head_layers)
    assert list(shapes) == list(head_shapes(template.head_layers))  # same order, too
    assert all(p.requires_grad for p in head.parameters())


@pytest.mark.parametrize("name", template_names())
def test_the_backbone_feeds_the_head_and_is_frozen(name: str) -> None:
    template = get_template(name)
    backbone = template.build_backbone(seed=1)
    x = torch.zeros((3, *template.input_shape))
    if backbone is None:
        assert template.backbone == "none"
        features = x.reshape(3, -1)
    else:
        assert not any(p.requires_grad for p in backbone.parameters())
        assert not backbone.training
        features = backbone(x)
    assert tuple(features.shape) == (3, template.feature_width)
    assert tuple(template.build_head()(features).shape) == (3, template.num_classes)


def test_digits_mlp_trains_everything_and_is_big_enough() -> None:
    template = get_template("digits_mlp")
    assert template.build_backbone() is None
    assert template.head_parameters >= 100_000
    assert template.head_parameters == 167_178


def test_building_is_seeded_and_leaves_the_global_generator_alone() -> None:
    template = get_template("digits_cnn")
    a, b, c = template.build_head(5), template.build_head(5), template.build_head(6)
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key])
        assert not torch.equal(value, c.state_dict()[key])
    one, two = template.build_backbone(5), template.build_backbone(5)
    assert one is not None
    assert two is not None
    for key, value in one.state_dict().items():
        assert torch.equal(value, two.state_dict()[key])


def test_unknown_template_names_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="digits_cnn, digits_mlp, machine_health"):
        get_template("resnet")
    assert set(template_names()) == set(TEMPLATES)


def test_inconsistent_templates_are_refused() -> None:
    layers = (LayerSpec("linear", 4, 2),)
    with pytest.raises(ValueError, match="one label per class"):
        Template("t", "digits", (4,), 2, ("a",), layers)
    with pytest.raises(ValueError, match="flat input"):
        Template("t", "digits", (5,), 2, ("a", "b"), layers)
    with pytest.raises(ValueError, match="one output per class"):
        Template("t", "digits", (4,), 3, ("a", "b", "c"), layers)
    with pytest.raises(ValueError, match="server-side split"):
        Template("t", "digits", (4,), 2, ("a", "b"), layers, backbone="standardize")


def test_standardize_uses_the_fitted_statistics() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(loc=[5.0, -3.0, 7.0], scale=[100.0, 0.01, 0.0], size=(500, 3))
    layer = Standardize(3)
    layer.fit(x)
    out = layer(torch.from_numpy(x.astype(np.float32))).double().numpy()
    np.testing.assert_allclose(out[:, :2].mean(axis=0), 0.0, atol=1e-4)
    np.testing.assert_allclose(out[:, :2].std(axis=0), 1.0, atol=1e-4)
    np.testing.assert_allclose(out[:, 2], 0.0, atol=1e-3)  # constant feature: scale 1


def test_centralized_digits_mlp_reaches_97_percent_on_the_holdout() -> None:
    result = baseline.run_baseline(get_template("digits_mlp"), seed=0)
    assert result.backbone is None
    assert result.train_samples == len(datasets.device_pool(get_template("digits_mlp"), 0))
    assert result.holdout_accuracy >= 0.97


def test_centralized_machine_health_is_accurate() -> None:
    result = baseline.run_baseline(get_template("machine_health"), seed=0)
    assert isinstance(result.backbone, Standardize)
    assert result.holdout_accuracy >= 0.93


def test_training_is_deterministic_by_seed() -> None:
    template = get_template("machine_health")
    pool = datasets.device_pool(template, 0)
    a = baseline.train_centralized(template, pool.x, pool.y, epochs=2, seed=4)
    b = baseline.train_centralized(template, pool.x, pool.y, epochs=2, seed=4)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_a_pretrained_conv_backbone_beats_a_random_one() -> None:
    template = get_template("digits_cnn")
    server = datasets.server_data(template, 0)
    pool = datasets.device_pool(template, 0)
    accuracies = []
    for backbone in (
        template.build_backbone(0),
        baseline.fit_backbone(template, server.pretrain.x, server.pretrain.y, 0),
    ):
        head = baseline.train_centralized(template, pool.x, pool.y, seed=0, backbone=backbone)
        accuracies.append(
            baseline.head_accuracy(template, backbone, head, server.holdout.x, server.holdout.y)
        )
    random_backbone, pretrained = accuracies
    assert pretrained >= 0.95
    assert pretrained > random_backbone + 0.03


@pytest.mark.parametrize("name", template_names())
def test_the_server_backbone_is_the_same_for_the_same_seed(name: str) -> None:
    template = get_template(name)
    one, two = baseline.server_backbone(template, 1), baseline.server_backbone(template, 1)
    if template.backbone == "none":
        assert one is None
        assert two is None
        return
    assert one is not None
    assert two is not None
    assert not any(p.requires_grad for p in one.parameters())
    for key, value in one.state_dict().items():
        assert torch.equal(value, two.state_dict()[key]), key
