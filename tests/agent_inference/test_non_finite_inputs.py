"""An input holding NaN or Inf (or values too large for float32) is refused as a bad input
on every predict path, so it never reaches the answers, the confidence metrics or the
feedback file that training reads (real service, real ONNX model)."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from agent.errors import InputError
from agent.feedback import FeedbackError, FeedbackLog
from agent.inference_service import InferenceService
from agent.model_store import ModelStore
from tests.agent_inference.conftest import Bundles, agent_config, put


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, 1e39])
@pytest.mark.parametrize("rows", [1, 3, 64])
def test_non_finite_inputs_are_refused_on_every_path(
    service: InferenceService, bundles: Bundles, bad: float, rows: int
) -> None:
    x = np.array(bundles.pixels[:rows], dtype=np.float64)
    x[-1, 5] = bad
    for attempt in range(3):  # the first call of a size runs plainly, later ones bound
        with np.errstate(over="ignore"):  # (1e39 becomes Inf in float32: refused all the same)
            batch = x.astype(np.float32) if attempt else x.tolist()
        with pytest.raises(InputError, match="NaN or Inf"):
            service.predict(batch if rows > 1 or attempt else batch[0])
    snapshot = service.runtime.metrics.snapshot()
    assert all(np.isfinite(v) for v in snapshot.values())
    good = service.predict(np.asarray(bundles.pixels[:rows], dtype=np.float32))
    assert all(0.0 <= c <= 1.0 for c in good.confidences)


def test_feedback_never_stores_a_row_training_cannot_read(tmp_path: Path) -> None:
    log = FeedbackLog(tmp_path, max_rows=10)
    row = np.ones(64, dtype=np.float32)
    assert log.append(row, 1) == 1
    for bad in (np.nan, np.inf):
        poisoned = row.copy()
        poisoned[3] = bad
        with pytest.raises(FeedbackError, match="NaN or Inf") as refused:
            log.append(poisoned, 2)
        assert refused.value.reason == "invalid"
    assert log.append(row, 3) == 2


def test_feedback_with_max_rows_zero_keeps_nothing(tmp_path: Path) -> None:
    log = FeedbackLog(tmp_path, max_rows=0)
    assert [log.append(np.ones(64, dtype=np.float32), 1) for _ in range(5)] == [0] * 5
    assert not log.path.exists()


def test_with_micro_batching_only_the_bad_request_is_refused(
    tmp_path: Path, bundles: Bundles
) -> None:
    config = agent_config(tmp_path, inference_batch_wait_ms=200)
    store = ModelStore(Path(config.data_dir) / "models")
    put(store, bundles.v1)
    service = InferenceService(config, store, tmp_path / "data")
    service.start()
    try:
        assert service.wait_idle(60)
        good = np.asarray(bundles.pixels[0], np.float32)
        bad = good.copy()
        bad[3] = np.nan
        results: dict[str, object] = {}

        def ask(name: str, x: np.ndarray) -> None:
            try:
                results[name] = service.predict(x).classes
            except InputError as exc:
                results[name] = exc

        threads = [threading.Thread(target=ask, args=a) for a in (("good", good), ("bad", bad))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert isinstance(results["bad"], InputError)
        assert results["good"] == [service.predict(good).classes[0]]
    finally:
        service.stop()
