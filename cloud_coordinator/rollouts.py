"""Rollouts: a model version to a fleet or a named group, through a canary first.

`RolloutManager.create` picks the target devices (every device, or those whose ``fleet``
is the group), a canary share of them (``canary_fraction``, at least one device; 0 sends
to all at once), remembers what each served before and the counters each reported, and
publishes the version's signed manifest, in a numbered and signed `Deployment`
(`deployments`), **retained** on each canary's ``dev/{id}/deploy``. Its thread then
judges the canary every second by the rule in `rollout_rules` and either promotes (the
version is deployed to the rest) or rolls back (each canary gets a new deployment, with a
higher number, of the version it served before). A device that cannot load a deployed
version says so in an ``Ack`` (ref ``deploy/{model}/{version}``), which rolls the canary
back at once. Operators can also promote or roll back by hand. Every decision
is stored with its reason (SQLite, ``rollouts`` table), so a restart resumes judging.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cloud_coordinator.blob_server import Publisher
from cloud_coordinator.deployments import DeploymentSigner
from cloud_coordinator.errors import StoreError
from cloud_coordinator.model_registry import ModelRegistry
from cloud_coordinator.registry import DeviceRecord
from cloud_coordinator.rollout_rules import (
    RolloutEvent,
    RolloutState,
    Rule,
    Verdict,
    Window,
    counters,
    judge,
    next_rollout_state,
)
from cloud_coordinator.sqlite_db import open_db
from cloud_coordinator.ticker import Ticker
from protocols.messages import Ack
from protocols.topics import DeviceChannel, device_topic, valid_id

log = logging.getLogger(__name__)
TICK_S = 1.0
ACK_PREFIX = "deploy/"
REFUSED = "deployment_rejected_"  # (the agent's deployer: an envelope it refused)

_SCHEMA = "CREATE TABLE IF NOT EXISTS rollouts (rollout_id TEXT PRIMARY KEY, body TEXT NOT NULL);"


class RolloutError(ValueError):
    """A rollout cannot be made or changed as asked; the message says why."""

    http_status = 400


class RolloutConflictError(RolloutError):
    """Another rollout of the model is still deciding on some of the same devices."""

    http_status = 409


@dataclass(slots=True)
class Rollout:
    """One rollout and everything needed to judge and finish it."""

    rollout_id: str
    model: str
    version: str
    group: str
    canary_fraction: float
    canary: list[str]
    rest: list[str]
    previous: dict[str, str]
    baseline: dict[str, dict[str, float]]
    rule: dict[str, float]
    state: str = RolloutState.CANARY.value
    created: float = 0.0
    decided: float | None = None
    reason: str = ""
    load_failures: dict[str, str] = field(default_factory=dict)
    health: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        """JSON-ready."""
        return asdict(self)


class RolloutStore:
    """Rollouts in the coordinator's database (one JSON body per rollout)."""

    def __init__(self, path: Path) -> None:
        self._db = open_db(path, _SCHEMA, "the rollout store")
        self._lock = threading.Lock()

    def put(self, rollout: Rollout) -> None:
        """Insert or replace a rollout."""
        with self._lock, self._db:
            self._db.execute("INSERT OR REPLACE INTO rollouts VALUES (?, ?)",
                             (rollout.rollout_id, json.dumps(rollout.as_json())))  # fmt: skip

    def all(self) -> list[Rollout]:
        """Every rollout, oldest first."""
        with self._lock:
            rows = self._db.execute("SELECT body FROM rollouts").fetchall()
        rollouts = [Rollout(**json.loads(body)) for (body,) in rows]
        return sorted(rollouts, key=lambda r: r.created)

    def close(self) -> None:
        """Close the database."""
        with self._lock:
            self._db.close()


class RolloutManager:
    """Creates rollouts and drives their canaries to a decision."""

    def __init__(
        self,
        store: RolloutStore,
        models: ModelRegistry,
        publisher: Publisher,
        devices: Callable[[], list[DeviceRecord]],
        signer: DeploymentSigner,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.signer = signer
        self.models = models
        self.publisher = publisher
        self.devices = devices
        self.clock = clock
        self._lock = threading.RLock()
        self._refusals_said: dict[str, float] = {}  # device → when its last refusal was logged
        self._rollouts = {r.rollout_id: r for r in store.all()}
        self._ticker = Ticker("rollouts", TICK_S, self.tick)

    # --- lifecycle -------------------------------------------------------------------
    def start(self) -> None:
        """Start judging canaries."""
        self._ticker.start()

    def stop(self) -> None:
        """Stop judging (state stays in the store)."""
        self._ticker.stop()

    # --- create ------------------------------------------------------------------------
    def create(self, body: object) -> dict[str, Any]:
        """Start a rollout from a JSON request; RolloutError naming what is wrong."""
        if not isinstance(body, dict):
            raise RolloutError("a rollout must be a JSON object")
        known = {"model", "version", "group", "canary_fraction", "rule"}
        if unknown := sorted(set(body) - known):
            raise RolloutError(f"unknown rollout fields {unknown}; valid: {sorted(known)}")
        model, version = body.get("model"), body.get("version")
        group = body.get("group", "")
        fraction = body.get("canary_fraction", 0.1)
        if not isinstance(model, str) or not isinstance(version, str):
            raise RolloutError("'model' and 'version' are required strings")
        if not isinstance(group, str) or (group and not valid_id(group)):
            raise RolloutError("'group' must be a fleet name (A-Z a-z 0-9 _ . -), or absent")
        number = isinstance(fraction, int | float) and not isinstance(fraction, bool)
        if not number or not 0 <= fraction <= 1:
            raise RolloutError("'canary_fraction' must be a number in [0, 1]")
        rule = self._rule(body.get("rule", {}))
        try:
            self.models.manifest(model, version)
        except StoreError:
            raise RolloutError(f"no version {version!r} of model {model!r} is registered") from None
        targets = sorted(d.device_id for d in self.devices() if not group or d.fleet == group)
        if not targets:
            raise RolloutError(f"no device in {'group ' + repr(group) if group else 'the fleet'}")
        share = math.ceil(fraction * len(targets))
        count = 0 if fraction == 0 else min(len(targets), max(1, share))
        ranked = sorted(targets, key=lambda d: zlib.crc32(f"{version}/{d}".encode()))
        records = {d.device_id: d for d in self.devices()}
        with self._lock:  # (held until it is stored: two at once cannot both pass the check)
            self._refuse_overlap(model, targets)
            return self._start(model, version, group, fraction, rule, targets, ranked, count,
                               records)  # fmt: skip

    def _refuse_overlap(self, model: str, targets: list[str]) -> None:
        """RolloutConflictError if a rollout of `model` still in canary shares a device: the
        older one would judge devices now serving the newer version, and roll them back."""
        for other in self._rollouts.values():
            if other.model != model or other.state != RolloutState.CANARY.value:
                continue
            shared = set(other.canary + other.rest) & set(targets)
            if shared:
                raise RolloutConflictError(
                    f"rollout {other.rollout_id} of {model} {other.version} is still in canary"
                    f" on {len(shared)} of these devices; promote or roll it back first"
                    f" (POST /v1/rollouts/{other.rollout_id}/promote or /rollback)"
                )

    def _start(self, model: str, version: str, group: str, fraction: float, rule: Rule,
               targets: list[str], ranked: list[str], count: int,
               records: Mapping[str, DeviceRecord]) -> dict[str, Any]:  # fmt: skip
        """Deploy a checked rollout to its canary (or, with none, to all) and store it."""
        rollout = Rollout(
            rollout_id=uuid.uuid4().hex[:12], model=model, version=version, group=group,
            canary_fraction=float(fraction), canary=sorted(ranked[:count]),
            rest=sorted(ranked[count:]),
            previous={d: self._registered(model, records[d].model_versions.get(model, ""))
                      for d in targets},
            baseline={d: counters(records[d].telemetry or {}) for d in targets},
            rule=asdict(rule), created=self.clock(),
        )  # fmt: skip
        if rollout.canary:
            self._deploy(rollout, rollout.canary)
        else:  # (promoting sends it to the rest: everyone, once)
            self._decide(rollout, RolloutEvent.PROMOTE, "no canary asked for: sent to all")
        self._rollouts[rollout.rollout_id] = rollout
        self.store.put(rollout)
        log.info("rollout %s: %s %s to %d devices, canary %s", rollout.rollout_id, model,
                 version, len(targets), rollout.canary)  # fmt: skip
        return rollout.as_json()

    @staticmethod
    def _rule(raw: object) -> Rule:
        if not isinstance(raw, dict):
            raise RolloutError("'rule' must be an object")
        names = set(Rule.__dataclass_fields__)
        if unknown := sorted(set(raw) - names):
            raise RolloutError(f"unknown rule fields {unknown}; valid: {sorted(names)}")
        if any(isinstance(v, bool) or not isinstance(v, int | float) for v in raw.values()):
            raise RolloutError("rule values must be numbers")
        try:
            return Rule(**raw)
        except (TypeError, ValueError, OverflowError) as exc:
            raise RolloutError(str(exc)) from None

    def _registered(self, model: str, version: str) -> str:
        """`version` if the registry holds it, else "" (a device reports what it likes)."""
        if not version:
            return ""
        try:
            self.models.manifest(model, version)
        except StoreError:
            log.warning("a device reports %s %r, which is not registered: it will not be "
                        "rolled back to it", model, version)  # fmt: skip
            return ""
        return version

    # --- deploy and decide ---------------------------------------------------------------
    def _deploy(self, rollout: Rollout, devices: list[str], version: str | None = None) -> None:
        """Publish a new deployment of a version, retained, on each device's deploy topic (a
        device that cannot be sent it is logged, and the others are still sent theirs)."""
        for device_id in devices:
            target = version if version is not None else rollout.version
            if not target:
                log.warning("rollout %s: %s served no earlier %s; left as it is",
                            rollout.rollout_id, device_id, rollout.model)  # fmt: skip
                continue
            try:
                manifest = self.models.manifest(rollout.model, target)
                payload = self.signer.payload(device_id, manifest)
                self.publisher.publish(device_topic(device_id, DeviceChannel.DEPLOY),
                                       payload, qos=1, retain=True)  # fmt: skip
            except Exception as exc:  # noqa: BLE001 - one device's failure (a store or
                # broker error) must not keep the rest of the fleet on the old decision
                log.error("rollout %s: %s %s not sent to %s: %s", rollout.rollout_id,
                          rollout.model, target, device_id, exc)  # fmt: skip

    def _decide(self, rollout: Rollout, event: RolloutEvent, reason: str) -> None:
        rollout.state = next_rollout_state(RolloutState(rollout.state), event).value
        rollout.decided, rollout.reason = self.clock(), reason
        if event is RolloutEvent.PROMOTE:
            self._deploy(rollout, rollout.rest)
        else:
            for device_id in rollout.canary:
                self._deploy(rollout, [device_id], rollout.previous.get(device_id, ""))
        log.info("rollout %s %s: %s", rollout.rollout_id, rollout.state, reason)

    def rolled_back(self, model: str) -> frozenset[str]:
        """Versions of `model` whose latest rollout was rolled back."""
        latest: dict[str, Rollout] = {}
        with self._lock:
            for rollout in self._rollouts.values():
                if rollout.model == model:
                    seen = latest.get(rollout.version)
                    if seen is None or rollout.created >= seen.created:
                        latest[rollout.version] = rollout
        back = RolloutState.ROLLED_BACK.value
        return frozenset(v for v, rollout in latest.items() if rollout.state == back)

    def steer(self, rollout_id: str, action: str) -> dict[str, Any]:
        """Promote or roll back a canary by hand; RolloutError if it is not one."""
        events = {"promote": RolloutEvent.PROMOTE, "rollback": RolloutEvent.ROLL_BACK}
        if action not in events:
            raise RolloutError(f"unknown action {action!r}; use promote or rollback")
        with self._lock:
            rollout = self._rollouts.get(rollout_id)
            if rollout is None:
                raise KeyError(rollout_id)
            if rollout.state != RolloutState.CANARY.value:
                raise RolloutError(f"rollout {rollout_id} is already {rollout.state}")
            self._decide(rollout, events[action], f"{action} by an operator")
            self.store.put(rollout)
            return rollout.as_json()

    def on_ack(self, device_id: str, ack: Ack) -> None:
        """Note a device's answer to a deployment (a failed load rolls its canary back; a
        deployment the device refused unread, as replayed or forged, says nothing of it)."""
        if not ack.ref.startswith(ACK_PREFIX) or ack.ok:
            return
        if ack.reason.startswith(REFUSED):  # (said, for whoever runs the fleet to look into,
            now = self.clock()  # once a minute a device: forgeries could flood the log)
            if now - self._refusals_said.get(device_id, -math.inf) >= 60.0:
                self._refusals_said[device_id] = now
                log.warning("%s refused a deployment of %s unread (%s): a replay or a forgery"
                            " on its deploy topic, or its pinned key is not this coordinator's",
                            device_id, ack.ref.removeprefix(ACK_PREFIX), ack.reason)  # fmt: skip
            return
        model, _, version = ack.ref.removeprefix(ACK_PREFIX).rpartition("/")
        with self._lock:
            for rollout in self._rollouts.values():
                ours = (rollout.model, rollout.version) == (model, version)
                deciding = rollout.state == RolloutState.CANARY.value  # (decided: kept as is)
                if ours and deciding and device_id in rollout.canary:
                    rollout.load_failures[device_id] = ack.reason or "load failed"

    def tick(self) -> None:
        """Judge every canary once."""
        with self._lock:
            if not any(r.state == RolloutState.CANARY.value for r in self._rollouts.values()):
                return  # nothing to judge: the registry is not read
        records = {d.device_id: d for d in self.devices()}
        with self._lock:
            for rollout in self._rollouts.values():
                if rollout.state != RolloutState.CANARY.value:
                    continue
                canary = self._window(rollout, rollout.canary, records, new=True)
                rest = self._window(rollout, rollout.rest, records, new=False)
                before = Window.robust(
                    [Window.between({}, rollout.baseline.get(d, {})) for d in rollout.canary]
                )
                rule = Rule(**rollout.rule)
                reference = rest if rest.requests >= rule.min_requests else (
                    before if before.requests >= rule.min_requests else None)  # fmt: skip
                failed = "; ".join(f"{d}: {r}" for d, r in sorted(rollout.load_failures.items()))
                verdict, reason = judge(canary, reference, rule,
                                        self.clock() - rollout.created, failed)  # fmt: skip
                rollout.health = {
                    "canary": _health(canary), "rest": _health(rest),
                    "reference": None if reference is None else _health(reference),
                    "verdict": verdict.value, "why": reason,
                }  # fmt: skip
                if verdict is not Verdict.WAIT:
                    event = (RolloutEvent.PROMOTE if verdict is Verdict.PROMOTE
                             else RolloutEvent.ROLL_BACK)  # fmt: skip
                    self._decide(rollout, event, reason)
                self.store.put(rollout)

    @staticmethod
    def _window(
        rollout: Rollout, devices: list[str], records: Mapping[str, DeviceRecord], new: bool
    ) -> Window:
        """Since the rollout began: the devices serving the new version (`new`), or those
        still serving the one they served before, combined so no one device swings it."""
        windows = []
        for d in devices:
            record = records.get(d)
            expected = rollout.version if new else rollout.previous.get(d, "")
            if (
                record is None
                or not expected
                or record.model_versions.get(rollout.model) != expected
            ):
                continue  # not serving that version: nothing of it to judge
            after = counters(record.telemetry or {})
            windows.append(Window.between(rollout.baseline.get(d, {}), after))
        return Window.robust(windows)

    # --- views -----------------------------------------------------------------------------
    def rollouts_json(self) -> list[dict[str, Any]]:
        """Every rollout, oldest first."""
        with self._lock:
            return [r.as_json() for r in sorted(self._rollouts.values(), key=lambda r: r.created)]

    def rollout_json(self, rollout_id: str) -> dict[str, Any] | None:
        """One rollout, or None."""
        with self._lock:
            rollout = self._rollouts.get(rollout_id)
            return None if rollout is None else rollout.as_json()


def _health(window: Window) -> dict[str, float | None]:
    return {"requests": window.requests, "error_rate": window.error_rate,
            "latency_ms": window.latency_ms, "confidence": window.confidence,
            "load_failures": window.load_failures}  # fmt: skip
