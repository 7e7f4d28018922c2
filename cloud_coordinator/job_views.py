"""Jobs and their rounds as JSON-ready dicts, for the HTTP API and the CLI."""

from __future__ import annotations

from cloud_coordinator.job_store import JobStore


def job_json(store: JobStore, job_id: str) -> dict[str, object] | None:
    """A job with every round's state and metrics, or None."""
    record = store.job(job_id)
    if record is None:
        return None
    rounds = [
        {"round": r.round, "state": r.state, "base_version": r.base_version,
         "new_version": r.new_version, "selected": list(r.selected), "started": r.started,
         "closed": r.closed, "metrics": r.metrics}
        for r in store.rounds(job_id)
    ]  # fmt: skip
    return {
        "job_id": job_id,
        "state": record.state,
        "message": record.message,
        "current_round": record.current_round,
        "current_version": record.current_version,
        "created": record.created,
        "spec": record.spec.to_json(),
        "rounds": rounds,
    }


def jobs_json(store: JobStore) -> list[dict[str, object]]:
    """Every job in brief, oldest first."""
    return [
        {"job_id": r.spec.job_id, "state": r.state, "template": r.spec.template,
         "current_round": r.current_round, "rounds": r.spec.rounds,
         "current_version": r.current_version, "message": r.message}
        for r in store.jobs()
    ]  # fmt: skip
