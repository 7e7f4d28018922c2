"""Labelling a prediction again, and ids that name no single row, over HTTP to the real
service: the last label given counts (one training row per prediction), and a batch's own
id is refused with what to send instead."""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from agent.client import InferenceClient
from agent.feedback import FeedbackError, FeedbackLog
from agent.inference_service import InferenceService
from agent.local_data import read_feedback
from tests.agent_inference.conftest import Bundles


@pytest.fixture
def client(service: InferenceService) -> Iterator[InferenceClient]:
    """A JSON client of `service` over loopback TCP."""
    assert service.server is not None
    with InferenceClient.connect(service.server.url) as c:
        yield c


def _stored(service: InferenceService) -> tuple[list[list[float]], list[int]]:
    x, y = read_feedback(service.feedback_log.path)
    return x.tolist(), y.tolist()


def test_a_prediction_labelled_again_keeps_one_row_with_the_last_label(
    service: InferenceService, client: InferenceClient, bundles: Bundles
) -> None:
    one = client.predict(bundles.pixels[7])
    assert client.feedback(one.prediction_id, 3)["replaced"] is False
    answer = client.feedback(one.prediction_id, 4)
    assert answer == {"stored": True, "rows": 1, "label_index": 4, "replaced": True}
    assert client.feedback(f"{one.prediction_id}.0", "5")["replaced"]  # (its other spelling)
    batch = client.predict(bundles.pixels[10:13])
    assert client.feedback(batch.row_id(1), 1)["rows"] == 2  # another prediction: a new row
    assert client.feedback(batch.row_id(1), 2)["rows"] == 2
    x, y = _stored(service)
    assert y == [5, 2]
    np.testing.assert_allclose(x, [bundles.pixels[7] / 16, bundles.pixels[11] / 16], rtol=1e-6)
    assert 'fedge_agent_feedback_total{outcome="stored"} 5' in client.metrics()


def test_a_batchs_own_id_is_refused_with_the_row_ids_to_use(
    service: InferenceService, client: InferenceClient, bundles: Bundles
) -> None:
    batch = client.predict(bundles.pixels[:3])
    with pytest.raises(FeedbackError, match=r"batch of 3 rows.*\.<row>") as refused:
        client.feedback(batch.prediction_id, 9)
    assert refused.value.reason == "invalid"  # (a 400, not the 404 of an unknown id)
    assert not service.feedback_log.path.exists()
    alone = client.predict(bundles.pixels[3:4])  # a batch of one row: its id names that row
    assert client.feedback(alone.prediction_id, 1)["stored"]
    assert 'fedge_agent_feedback_total{outcome="invalid"} 1' in client.metrics()


def test_a_label_for_a_row_dropped_since_adds_it_again(tmp_path: Path) -> None:
    log = FeedbackLog(tmp_path, max_rows=2)
    rows = np.eye(3, dtype=np.float32)
    assert log.put((1, 0), rows[0], 1) == (1, False)
    assert log.put((2, 0), rows[1], 2) == (2, False)
    assert log.put((3, 0), rows[2], 3) == (2, False)  # row 0 dropped: at most two kept
    assert log.put((2, 0), rows[1], 7) == (2, True)
    assert log.put((1, 0), rows[0], 8) == (2, False)  # dropped, so added anew
    x, y = read_feedback(log.path)
    assert y.tolist() == [3, 8]
    np.testing.assert_array_equal(x, rows[[2, 0]])


def test_a_feedback_body_over_64_kib_is_413_before_it_is_decoded(
    service: InferenceService,
) -> None:
    assert service.server is not None
    conn = http.client.HTTPConnection("127.0.0.1", service.server.address.port, timeout=10)
    body = b'{"prediction_id": [' + b"[]," * 30_000 + b'[]], "label": 1}'  # ~90 KB of lists
    conn.request("POST", "/v1/feedback", body=body, headers={"Content-Type": "application/json"})
    answer = conn.getresponse()
    assert answer.status == 413
    assert f"body over {64 * 1024} bytes" in json.loads(answer.read())["error"]
    conn.close()
