"""Rollouts: the canary rule (pure), and the manager over a real registry of versions and a
real SQLite store, with telemetry played by hand and a fake clock."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cloud_coordinator import bundles
from cloud_coordinator.deployments import DeploymentSigner
from cloud_coordinator.model_registry import ModelRegistry
from cloud_coordinator.registry import DeviceRecord
from cloud_coordinator.rollout_rules import (
    IllegalRolloutTransitionError,
    RolloutEvent,
    RolloutState,
    Rule,
    Verdict,
    Window,
    counters,
    judge,
    next_rollout_state,
)
from cloud_coordinator.rollouts import (
    RolloutConflictError,
    RolloutError,
    RolloutManager,
    RolloutStore,
)
from cloud_coordinator.templates import get_template
from protocols.messages import Ack, Deployment, decode_as
from protocols.signing import generate_private_key, public_key, verify_deployment
from tests.unit.fl.test_job_runner import FakePublisher

RULE = Rule(min_duration_s=60, max_wait_s=600, min_requests=100)


def w(requests: float, errors: float = 0, latency: float = 1.0, confidence: float = 0.9) -> Window:
    ok = requests - errors
    return Window(requests, errors, 0, latency * ok, ok, confidence * ok, ok)


# --- the rule ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("canary", "reference", "elapsed", "verdict", "words"),
    [
        (w(500), w(5000), 120, Verdict.PROMOTE, "healthy"),
        (w(50), w(5000), 120, Verdict.WAIT, "50 of 100"),
        (w(50), w(5000), 601, Verdict.ROLL_BACK, "too little traffic"),
        (w(500), w(5000), 30, Verdict.WAIT, "30s of 60s"),
        (w(500, errors=20), w(5000, errors=10), 120, Verdict.ROLL_BACK, "error rate 4.00%"),
        (w(500, errors=5), w(5000, errors=10), 120, Verdict.PROMOTE, "healthy"),
        (w(500, latency=2.0), w(5000, latency=1.0), 120, Verdict.ROLL_BACK, "latency"),
        (w(500, latency=1.4), w(5000, latency=1.0), 120, Verdict.PROMOTE, "healthy"),
        # x1.7, but 0.25 ms: jitter at sub-millisecond latencies, not a regression
        (w(500, latency=0.61), w(5000, latency=0.36), 120, Verdict.PROMOTE, "healthy"),
        (w(500, latency=0.9), w(5000, latency=0.36), 120, Verdict.ROLL_BACK, "+0.5 ms"),
        (w(500, confidence=0.8), w(5000), 120, Verdict.ROLL_BACK, "confidence"),
        (w(500, errors=4), None, 120, Verdict.PROMOTE, "healthy"),  # 0.8% <= 1% absolute
        (w(500, errors=10), None, 120, Verdict.ROLL_BACK, "error rate"),
    ],
)
def test_judge_applies_the_stated_rule(
    canary: Window, reference: Window | None, elapsed: float, verdict: Verdict, words: str
) -> None:
    got, reason = judge(canary, reference, RULE, elapsed)
    assert got is verdict
    assert words in reason


def test_a_load_failure_rolls_back_whatever_the_traffic() -> None:
    verdict, reason = judge(Window(), None, RULE, 0.0, "cam-1: warmup")
    assert verdict is Verdict.ROLL_BACK
    assert "cam-1: warmup" in reason
    verdict, _ = judge(dataclasses.replace(w(500), load_failures=1), w(500), RULE, 120)
    assert verdict is Verdict.ROLL_BACK


def test_state_table_and_rule_validation() -> None:
    assert next_rollout_state(RolloutState.CANARY, RolloutEvent.PROMOTE) is RolloutState.PROMOTED
    with pytest.raises(IllegalRolloutTransitionError):
        next_rollout_state(RolloutState.PROMOTED, RolloutEvent.ROLL_BACK)
    with pytest.raises(ValueError, match="max_wait_s"):
        Rule(min_duration_s=100, max_wait_s=10)
    with pytest.raises(ValueError, match="min_requests"):
        Rule(min_requests=-1)


def test_windows_from_telemetry_counters_and_restarts() -> None:
    extra = {"extra.inference_ok": 90.0, "extra.inference_error": 6.0,
             "extra.inference_unavailable": 4.0, "extra.inference_invalid": 50.0,
             "extra.inference_latency_mean_ms": 2.0, "extra.inference_confidence_mean": 0.5,
             "extra.inference_rows": 90.0, "extra.model_load_failures": 1.0}  # fmt: skip
    c = counters(extra)
    assert (c["requests"], c["errors"], c["load_failures"]) == (100.0, 10.0, 1.0)
    window = Window.between({}, c)
    assert (window.error_rate, window.latency_ms, window.confidence) == (0.1, 2.0, 0.5)
    more = counters({**extra, "extra.inference_ok": 190.0, "extra.inference_rows": 190.0})
    assert Window.between(c, more).requests == 100.0
    assert Window.between(more, c).requests == c["requests"]  # counters reset: a restart


# --- the manager ---------------------------------------------------------------------------


class Fleet:
    """Devices as the registry would show them; telemetry set by the test."""

    def __init__(self) -> None:
        self.records: dict[str, DeviceRecord] = {}
        self.now = 1000.0

    def add(self, device_id: str, fleet: str, version: str) -> None:
        self.records[device_id] = DeviceRecord(device_id, 0, 0, True, None, "", "", {},
                                               {"m": version}, fleet)  # fmt: skip

    def report(self, device_id: str, version: str, ok: float, errors: float = 0,
               latency: float = 1.0, confidence: float = 0.9) -> None:  # fmt: skip
        extra = {
            "extra.inference_ok": ok,
            "extra.inference_error": errors,
            "extra.inference_latency_mean_ms": latency,
            "extra.inference_confidence_mean": confidence,
            "extra.inference_rows": ok,
        }
        record = self.records[device_id]
        self.records[device_id] = dataclasses.replace(
            record, telemetry=extra, model_versions={"m": version}
        )

    def devices(self) -> list[DeviceRecord]:
        return list(self.records.values())


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModelRegistry]:
    registry = ModelRegistry(tmp_path_factory.mktemp("ro") / "models")
    b1, _ = bundles.initial_bundle(get_template("digits_mlp"), "m", "v1", 0)
    b2 = bundles.next_bundle(b1, b1.head_state(), "v2")
    for n, b in enumerate((b1, b2)):
        registry.put(b, job_id="j", round=n, devices=(), metrics={})
    yield registry
    registry.close()


KEY = generate_private_key()


class World:
    """A manager over a fresh store, six devices (four in group 'lab', two in 'field')."""

    def __init__(self, root: Path, models: ModelRegistry) -> None:
        self.root, self.models = root, models
        self.fleet = Fleet()
        for n in range(6):
            self.fleet.add(f"cam-{n}", "lab" if n < 4 else "field", "v1")
            self.fleet.report(f"cam-{n}", "v1", ok=1000)
        self.open()

    def open(self) -> None:
        self.publisher = FakePublisher()
        self.store = RolloutStore(self.root / "coordinator.db")
        self.signer = DeploymentSigner(self.root / "coordinator.db", KEY)
        self.manager = RolloutManager(self.store, self.models, self.publisher,
                                      self.fleet.devices, self.signer,
                                      clock=lambda: self.fleet.now)  # fmt: skip

    def restart(self) -> None:
        self.store.close()
        self.signer.close()
        self.open()

    def deployments(self) -> list[Deployment]:
        """Every deployment published, in order, each checked: retained, signed, addressed."""
        found = []
        for p in self.publisher.sent:
            assert (p.retain, p.qos) == (True, 1)
            deployment = decode_as(Deployment, p.payload)
            verify_deployment(deployment, {public_key(KEY)})
            assert deployment.device_id == p.topic.split("/")[3]
            found.append(deployment)
        return found

    def deployed(self) -> dict[str, str]:
        """The version last published on each device's deploy topic."""
        return {d.device_id: d.manifest.version for d in self.deployments()}

    def serve(self, devices: list[str], version: str, ok: float, **kw: Any) -> None:
        for d in devices:
            self.fleet.report(d, version, ok=ok, **kw)


@pytest.fixture
def world(tmp_path: Path, models: ModelRegistry) -> Iterator[World]:
    wld = World(tmp_path, models)
    yield wld
    wld.store.close()


FAST = {"min_duration_s": 60, "min_requests": 100, "max_wait_s": 600}


def test_a_healthy_canary_is_promoted_to_the_rest_of_its_group(world: World) -> None:
    r = world.manager.create({"model": "m", "version": "v2", "group": "lab",
                              "canary_fraction": 0.25, "rule": FAST})  # fmt: skip
    assert r["state"] == "canary"
    assert (len(r["canary"]), len(r["rest"])) == (1, 3)  # 25 % of the 4 lab devices
    canary = r["canary"]
    assert world.deployed() == {canary[0]: "v2"}
    assert r["previous"] == {f"cam-{n}": "v1" for n in range(4)}
    world.manager.tick()
    assert state_of(world, r) == "canary"  # not serving yet
    world.serve(canary, "v2", ok=1000 + 300)  # 300 predictions on v2, all fine
    world.serve(r["rest"], "v1", ok=1000 + 3000)
    world.fleet.now += 61
    world.manager.tick()
    done = world.manager.rollout_json(r["rollout_id"])
    assert done is not None
    assert done["state"] == "promoted"
    assert "healthy" in done["reason"]
    assert done["health"]["canary"]["requests"] == 300
    assert world.deployed() == {f"cam-{n}": "v2" for n in range(4)}  # never the field group


def test_a_worse_canary_is_rolled_back_to_what_it_served(world: World) -> None:
    r = world.manager.create({"model": "m", "version": "v2", "canary_fraction": 0.5,
                              "rule": FAST})  # fmt: skip
    assert len(r["canary"]) == 3
    world.serve(r["canary"], "v2", ok=1000 + 200, errors=40)  # 40 of 240 fail
    world.serve(r["rest"], "v1", ok=1000 + 2000)
    world.fleet.now += 120
    world.manager.tick()
    done = world.manager.rollout_json(r["rollout_id"])
    assert done is not None
    assert done["state"] == "rolled_back"
    assert "error rate" in done["reason"]
    deployed = world.deployed()
    assert all(deployed[d] == "v1" for d in r["canary"])  # back to the version before
    assert not any(d in deployed for d in r["rest"])


def test_a_canary_that_cannot_load_rolls_back_at_once(world: World) -> None:
    r = world.manager.create({"model": "m", "version": "v2", "canary_fraction": 0.1})
    (canary,) = r["canary"]
    world.manager.on_ack(canary, Ack("deploy/m/v1", False, 0.0, "old"))  # another version
    world.manager.on_ack(canary, Ack("deploy/m/v2", True, 0.0, ""))
    world.manager.tick()
    assert state_of(world, r) == "canary"
    world.manager.on_ack(canary, Ack("deploy/m/v2", False, 0.0, "warmup"))
    world.manager.tick()
    done = world.manager.rollout_json(r["rollout_id"])
    assert done is not None
    assert (done["state"], done["load_failures"]) == ("rolled_back", {canary: "warmup"})
    assert f"{canary}: warmup" in done["reason"]


def test_a_deployment_the_device_refused_unread_rolls_nothing_back(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    # (anyone who can publish on the deploy topic can make a device refuse a replay)
    r = world.manager.create({"model": "m", "version": "v2", "canary_fraction": 0.1})
    (canary,) = r["canary"]
    for reason in ("replayed", "wrong_device", "bad_signature"):
        refused = Ack("deploy/m/v2", False, 0.0, f"deployment_rejected_{reason}")
        with caplog.at_level("WARNING", logger="cloud_coordinator.rollouts"):
            world.manager.on_ack(canary, refused)
    world.manager.tick()
    assert state_of(world, r) == "canary"
    said = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(said) == 1  # (once a minute a device: forgeries could flood the log)
    assert f"{canary} refused a deployment of m/v2 unread (deployment_rejected_replayed)" in said[0]


def test_every_deployment_is_signed_and_numbered_higher_also_after_a_restart(
    world: World,
) -> None:
    r = world.manager.create({"model": "m", "version": "v2", "canary_fraction": 0.5})
    sent = world.deployments()
    world.restart()
    world.manager.steer(r["rollout_id"], "rollback")  # the canary goes back to v1
    back = world.deployments()
    world.restart()
    world.manager.create({"model": "m", "version": "v2", "group": "field"})
    sent += back + world.deployments()
    numbers = [d.seq for d in sent]
    assert numbers == sorted(set(numbers)), numbers  # one counter, all devices
    assert len(numbers) == 7
    assert [(d.device_id, d.manifest.version) for d in back] == [(c, "v1") for c in r["canary"]]
    assert all(d.manifest == world.models.manifest("m", d.manifest.version) for d in sent)


def test_no_canary_sends_to_all_and_operators_can_decide(world: World) -> None:
    r = world.manager.create({"model": "m", "version": "v2", "canary_fraction": 0})
    assert r["state"] == "promoted"
    assert len(world.deployed()) == 6
    r2 = world.manager.create({"model": "m", "version": "v1", "group": "field"})
    assert r2["state"] == "canary"
    with pytest.raises(RolloutError, match="unknown action"):
        world.manager.steer(r2["rollout_id"], "explode")
    assert world.manager.steer(r2["rollout_id"], "promote")["state"] == "promoted"
    with pytest.raises(RolloutError, match="already promoted"):
        world.manager.steer(r2["rollout_id"], "rollback")
    with pytest.raises(KeyError):
        world.manager.steer("nope", "promote")


def test_a_restart_resumes_judging(world: World) -> None:
    r = world.manager.create({"model": "m", "version": "v2", "canary_fraction": 0.5,
                              "rule": FAST})  # fmt: skip
    world.restart()
    assert [x["rollout_id"] for x in world.manager.rollouts_json()] == [r["rollout_id"]]
    world.serve(r["canary"], "v2", ok=1000 + 500)
    world.fleet.now += 61
    world.manager.tick()
    assert state_of(world, r) == "promoted"


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ([], "JSON object"),
        ({"model": "m"}, "required"),
        ({"model": "m", "version": "v9"}, "no version 'v9'"),
        ({"model": "m", "version": "v2", "group": "moon"}, "no device in group 'moon'"),
        ({"model": "m", "version": "v2", "canary_fraction": 2}, "canary_fraction"),
        ({"model": "m", "version": "v2", "canary_fraction": True}, "canary_fraction"),
        ({"model": "m", "version": "v2", "rule": {"speed": 1}}, "unknown rule fields"),
        ({"model": "m", "version": "v2", "colour": "red"}, "unknown rollout fields"),
        ({"model": "m", "version": "v2", "rule": {"min_duration_s": 10**400}}, "too large"),
    ],
)
def test_bad_requests_are_refused_before_anything_is_sent(
    world: World, body: object, match: str
) -> None:
    with pytest.raises(RolloutError, match=match):
        world.manager.create(body)
    assert world.publisher.sent == []
    assert world.manager.rollouts_json() == []


def test_a_version_the_registry_lacks_is_no_rollback_target(world: World) -> None:
    world.serve(["cam-5"], "not-a-version", ok=1000)  # what a device may report
    r = world.manager.create({"model": "m", "version": "v2", "canary_fraction": 1})
    assert r["previous"]["cam-5"] == ""
    assert r["previous"]["cam-0"] == "v1"
    assert world.manager.steer(r["rollout_id"], "rollback")["state"] == "rolled_back"
    deployed = world.deployed()
    assert {d: deployed[d] for d in r["canary"] if d != "cam-5"} == {
        f"cam-{n}": "v1" for n in range(5)
    }  # every canary but the one with nothing to go back to
    assert deployed["cam-5"] == "v2"
    world.restart()
    assert state_of(world, r) == "rolled_back"  # the decision was stored whole


def test_a_deploy_one_device_cannot_be_sent_still_reaches_the_others(world: World) -> None:
    sent = world.publisher.publish

    def publish(topic: str, payload: bytes, qos: int = 1, retain: bool = False) -> object:
        if "/cam-2/" in topic:
            raise RuntimeError("outgoing queue full")
        return sent(topic, payload, qos, retain)

    world.publisher.publish = publish  # type: ignore[method-assign]
    r = world.manager.create({"model": "m", "version": "v2", "canary_fraction": 0})
    assert r["state"] == "promoted"
    assert sorted(world.deployed()) == [f"cam-{n}" for n in (0, 1, 3, 4, 5)]
    world.restart()
    assert state_of(world, r) == "promoted"


def state_of(world: World, rollout: dict[str, Any]) -> str:
    """The stored state of a rollout."""
    found = world.manager.rollout_json(rollout["rollout_id"])
    assert found is not None
    return str(found["state"])


def test_no_canary_sends_each_device_its_manifest_once(world: World) -> None:
    world.manager.create({"model": "m", "version": "v2", "canary_fraction": 0})
    topics = [p.topic for p in world.publisher.sent]
    assert len(topics) == len(set(topics)) == 6


def test_a_second_rollout_on_devices_still_in_canary_is_refused(world: World) -> None:
    first = world.manager.create({"model": "m", "version": "v2", "group": "lab"})
    sent = len(world.publisher.sent)
    with pytest.raises(RolloutConflictError, match=f"rollout {first['rollout_id']} of m v2"):
        world.manager.create({"model": "m", "version": "v1"})  # the whole fleet: overlaps
    assert len(world.publisher.sent) == sent  # nothing sent for the refused one
    other = world.manager.create({"model": "m", "version": "v1", "group": "field"})
    assert other["state"] == "canary"  # other devices: fine
    world.manager.steer(first["rollout_id"], "rollback")
    assert world.manager.create({"model": "m", "version": "v2", "group": "lab"})["state"]


def test_nothing_in_canary_means_the_registry_is_not_read(world: World) -> None:
    reads = []
    devices = world.fleet.devices
    world.manager.devices = lambda: reads.append(1) or devices()  # type: ignore[method-assign]
    world.manager.tick()
    assert reads == []
    world.manager.create({"model": "m", "version": "v2", "canary_fraction": 0})  # decided
    reads.clear()
    world.manager.tick()
    assert reads == []


def test_absurd_but_finite_telemetry_makes_no_infinite_counters() -> None:
    extra = {"extra.inference_ok": 1e300, "extra.inference_latency_mean_ms": 1e300,
             "extra.inference_confidence_mean": 1e300, "extra.inference_rows": 1e300}  # fmt: skip
    got = counters(extra)
    assert all(math.isfinite(v) for v in got.values())
    assert got["latency_ms_sum"] == 0.0


def test_a_failed_load_reported_after_the_decision_changes_nothing(world: World) -> None:
    r = world.manager.create({"model": "m", "version": "v2", "canary_fraction": 0.1})
    (canary,) = r["canary"]
    world.manager.steer(r["rollout_id"], "promote")
    world.manager.on_ack(canary, Ack("deploy/m/v2", False, 0.0, "late failure"))
    after = world.manager.rollout_json(r["rollout_id"])
    assert after is not None
    assert after["load_failures"] == {}  # what the store holds too: nothing unsaved
    world.restart()
    assert world.manager.rollout_json(r["rollout_id"]) == after


def test_versions_whose_latest_rollout_was_rolled_back_are_named(world: World) -> None:
    assert world.manager.rolled_back("m") == frozenset()
    r = world.manager.create({"model": "m", "version": "v2", "group": "lab"})
    assert world.manager.rolled_back("m") == frozenset()  # still deciding
    world.manager.steer(r["rollout_id"], "rollback")
    assert world.manager.rolled_back("m") == {"v2"}
    assert world.manager.rolled_back("other") == frozenset()
    world.fleet.now += 1
    again = world.manager.create({"model": "m", "version": "v2", "group": "lab"})
    world.manager.steer(again["rollout_id"], "promote")  # a later rollout of it succeeded
    assert world.manager.rolled_back("m") == frozenset()
    world.restart()  # the rollouts are read back from the store
    assert world.manager.rolled_back("m") == frozenset()


def test_the_reference_is_the_rest_on_the_version_they_served_before(world: World) -> None:
    r = world.manager.create({"model": "m", "version": "v2", "group": "lab",
                              "canary_fraction": 0.25, "rule": FAST})  # fmt: skip
    rest = r["rest"]
    world.serve(r["canary"], "v2", ok=1000 + 400)
    world.serve(rest, "v1", ok=1000 + 2000, latency=2.0)  # the old version: the reference
    world.fleet.now += 61
    world.manager.tick()
    done = world.manager.rollout_json(r["rollout_id"])
    assert done is not None
    assert done["health"]["reference"]["requests"] == 3 * 2000
    assert done["health"]["reference"]["latency_ms"] == 2.5  # (6000 - 1000 ms) / 2000


@pytest.mark.parametrize("claims", ["v2", "v1"])
def test_one_rogue_device_in_the_rest_cannot_get_a_broken_canary_promoted(
    world: World, claims: str
) -> None:
    # Its telemetry is its own word: a huge error count (on the new version, or the old)
    # would make the canary look better than the reference.
    r = world.manager.create({"model": "m", "version": "v2", "group": "lab",
                              "canary_fraction": 0.25, "rule": FAST})  # fmt: skip
    rogue, *honest = r["rest"]
    world.serve(r["canary"], "v2", ok=1000 + 400, errors=600)  # 60 % of requests fail
    world.serve(honest, "v1", ok=1000 + 2000)
    world.serve([rogue], claims, ok=1000, errors=10**9, latency=10**6)
    world.fleet.now += 61
    world.manager.tick()
    assert state_of(world, r) == "rolled_back"


def test_a_robust_window_takes_each_rate_from_the_median_device() -> None:
    honest = [Window(requests=100, errors=1, latency_ms_sum=100, latency_count=99,
                     confidence_sum=90, confidence_count=100) for _ in range(3)]  # fmt: skip
    rogue = Window(requests=1e9, errors=1e9, latency_ms_sum=1e12, latency_count=1,
                   confidence_sum=0, confidence_count=1e9)  # fmt: skip
    combined = Window.robust([*honest, rogue])
    assert combined.error_rate == pytest.approx(0.01)
    assert combined.latency_ms == pytest.approx(100 / 99)
    assert combined.confidence == pytest.approx(0.9)
    assert combined.requests == 3 * 100 + 3 * 100  # the rogue counts 3x the median at most
    assert Window.robust([]) == Window()
    assert Window.robust([honest[0]]) == honest[0]
