"""The inference metrics' histograms: bucket counts as Prometheus reads them (``le``); and
every family of the real service's /metrics comes with its HELP line."""

from __future__ import annotations

import bisect

import numpy as np

from agent.client import InferenceClient
from agent.inference_metrics import (
    _CONF_EDGES,
    CONFIDENCE_BUCKETS,
    LATENCY_BUCKETS,
    InferenceMetrics,
    _fold_into,
    _Histogram,
)
from agent.inference_service import InferenceService


def _bisect_counts(bounds: tuple[float, ...], values: list[float]) -> list[int]:
    counts = [0] * (len(bounds) + 1)
    for v in values:
        counts[len(bounds) if v != v else bisect.bisect_left(bounds, v)] += 1  # NaN: +Inf
    return counts


def test_values_on_between_and_beyond_the_bounds_land_where_bisect_puts_them() -> None:
    bounds = np.asarray(CONFIDENCE_BUCKETS)
    values = np.concatenate([
        np.random.default_rng(0).random(5000),
        bounds, np.nextafter(bounds, 2.0), np.nextafter(bounds, -1.0),
        [-1.0, 0.0, 2.0, np.inf, np.nan],
    ])  # fmt: skip
    hist = _Histogram(CONFIDENCE_BUCKETS)
    _fold_into(hist, _CONF_EDGES, values[:2000])
    _fold_into(hist, _CONF_EDGES, values[2000:])  # folds add up
    assert hist.counts == _bisect_counts(CONFIDENCE_BUCKETS, values.tolist())
    assert hist.count == len(values)


def test_float32_confidences_are_compared_as_they_are_not_as_rounded_bounds() -> None:
    # float32(0.1) is a little above 0.1: it belongs to the 0.2 bucket, not the 0.1 one
    metrics = InferenceMetrics()
    metrics.observe_batch(0.001, np.array([0.1, 0.5, 1.0], dtype=np.float32))
    text = metrics.render()
    assert 'fedge_agent_prediction_confidence_bucket{le="0.1"} 0' in text
    assert 'fedge_agent_prediction_confidence_bucket{le="0.2"} 1' in text
    assert 'fedge_agent_prediction_confidence_bucket{le="1.0"} 3' in text


def test_latencies_fold_into_their_buckets() -> None:
    metrics = InferenceMetrics()
    for seconds in (0.00005, 0.0001, 0.0003, 2.0):
        metrics.observe_one(seconds, 0.9)
    text = metrics.render()
    assert _bisect_counts(LATENCY_BUCKETS, [0.00005, 0.0001, 0.0003, 2.0])[:3] == [2, 0, 1]
    assert 'fedge_agent_predict_latency_seconds_bucket{le="0.0001"} 2' in text
    assert 'fedge_agent_predict_latency_seconds_bucket{le="0.0005"} 3' in text
    assert 'fedge_agent_predict_latency_seconds_bucket{le="+Inf"} 4' in text


def test_every_metric_family_has_help_then_type(service: InferenceService) -> None:
    assert service.server is not None
    with InferenceClient.connect(service.server.url) as client:
        client.predict(np.zeros(64, np.float32))
        lines = client.metrics().splitlines()
    types = [i for i, line in enumerate(lines) if line.startswith("# TYPE ")]
    assert len(types) >= 10
    for i in types:
        name = lines[i].split()[2]
        help_line = lines[i - 1]
        assert help_line.startswith(f"# HELP {name} "), (name, help_line)
        assert len(help_line) > len(f"# HELP {name} ") + 5  # (says something)
    assert sum(line.startswith("# HELP ") for line in lines) == len(types)
