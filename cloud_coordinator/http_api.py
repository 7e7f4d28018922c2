"""The coordinator's HTTP API (stdlib server, one thread per request).

GET /healthz          liveness and broker connection
GET /metrics          Prometheus text: devices online, messages accepted and rejected
GET /v1/devices       the fleet as JSON (?limit=N&after=ID: one page, and `next`)
GET /v1/rejections    rejection counts by channel and reason
GET /v1/signing-key   the public key model manifests are signed with (devices pin it)
GET /v1/jobs          training jobs in brief
GET /v1/jobs/{id}     one job with every round's metrics
POST /v1/jobs         start a job (JSON body: the job spec; 400 names a bad field)
GET /v1/rollouts      every rollout, with its canary's health and the decision
GET /v1/rollouts/{id} one rollout
POST /v1/rollouts     deploy a version (JSON: model, version, group, canary_fraction, rule)
POST /v1/rollouts/{id}/promote, /rollback   decide a canary by hand

No authentication: keep it on loopback or behind a proxy that adds some. Requests from
web pages (a cross-site Origin or Sec-Fetch-Site, or a Host that is neither a local name,
an IP address nor `http_host`: DNS rebinding) are refused with 403; a malformed
Content-Length is 400, HEAD answers as GET without the body, another method than GET, HEAD
or POST 405, an unexpected error a logged
500. Bodies are JSON without NaN or Infinity (a non-finite number a device reported is
null). A connection idle for `IDLE_TIMEOUT_S` is closed, and at most `MAX_CONNECTIONS` are
served at once (the next get 503).
"""

from __future__ import annotations

import json
import logging
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qs, urlsplit

from cloud_coordinator.errors import StoreError
from cloud_coordinator.registry import count_devices, read_devices, read_rejections
from cloud_coordinator.signing_key import read_public_key
from protocols import __version__, web_origin
from protocols.signing import key_text

log = logging.getLogger(__name__)


class JobsApi(Protocol):
    """What the API needs from the job runner."""

    def create_json(self, body: object) -> dict[str, object]:
        """Start a job from a JSON spec; ValueError naming what is wrong."""

    def job_json(self, job_id: str) -> dict[str, object] | None:
        """One job with its rounds, or None."""

    def jobs_json(self) -> list[dict[str, object]]:
        """Every job in brief."""


class RolloutsApi(Protocol):
    """What the API needs from the rollout manager."""

    def create(self, body: object) -> dict[str, Any]:
        """Start a rollout; ValueError naming what is wrong."""

    def steer(self, rollout_id: str, action: str) -> dict[str, Any]:
        """Promote or roll back by hand; KeyError if unknown, ValueError if not a canary."""

    def rollouts_json(self) -> list[dict[str, Any]]:
        """Every rollout."""

    def rollout_json(self, rollout_id: str) -> dict[str, Any] | None:
        """One rollout, or None."""


@dataclass(frozen=True, slots=True)
class ApiState:
    """What the API reads: the registry file and live counters from the running service."""

    db_path: Path
    mqtt_connected: Callable[[], bool]
    accepted: Callable[[], dict[str, int]]
    jobs: JobsApi | None = None
    rollouts: RolloutsApi | None = None
    host_names: tuple[str, ...] = ()  # Host names besides local ones (the bound name)


def _metrics(state: ApiState) -> str:
    online, total = count_devices(state.db_path)
    rejections = read_rejections(state.db_path)
    lines = [
        "# HELP fedge_devices Devices known to the registry, by state.",
        "# TYPE fedge_devices gauge",
        f'fedge_devices{{state="online"}} {online}',
        f'fedge_devices{{state="offline"}} {total - online}',
        "# HELP fedge_mqtt_connected 1 while the coordinator is connected to the broker.",
        "# TYPE fedge_mqtt_connected gauge",
        f"fedge_mqtt_connected {int(state.mqtt_connected())}",
        "# HELP fedge_messages_accepted_total Device messages applied, by channel (since start).",
        "# TYPE fedge_messages_accepted_total counter",
    ]
    lines += [
        f'fedge_messages_accepted_total{{channel="{c}"}} {n}'
        for c, n in sorted(state.accepted().items())
    ]
    lines += [
        "# HELP fedge_messages_rejected_total Device messages rejected, by channel and reason.",
        "# TYPE fedge_messages_rejected_total counter",
    ]
    lines += [
        f'fedge_messages_rejected_total{{channel="{c}",reason="{r}"}} {n}'
        for (c, r), n in rejections.items()
    ]
    return "\n".join(lines) + "\n"


class _Handler(BaseHTTPRequestHandler):
    server_version = f"fedge-coordinator/{__version__}"
    state: ApiState  # set on the subclass made by `serve`

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("http %s", format % args)

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if self.command != "HEAD":  # (HEAD: GET's answer without its body)
            self.wfile.write(body)

    def _json(self, status: int, value: object) -> None:
        try:
            body = json.dumps(value, allow_nan=False)
        except ValueError:  # a NaN or Infinity somewhere (from a device): null in JSON
            body = json.dumps(_finite(value), allow_nan=False)
        self._send(status, body.encode(), "application/json")

    def _from_web_page(self) -> bool:
        """Answer 403 and return True if this request comes from a web page."""
        h = self.headers
        why = web_origin.refusal(
            h.get("Host"), h.get("Origin"), h.get("Sec-Fetch-Site"), self.state.host_names
        )
        if why is not None:
            self.close_connection = True
            self._json(403, {"error": why})
        return why is not None

    def do_GET(self) -> None:
        if self._from_web_page():
            return
        try:
            self._get()
        except Exception as exc:  # answered and logged; the server goes on
            log.exception("http: GET %s failed", self.path)
            self._json(500, {"error": f"internal error ({type(exc).__name__}); see the log"})

    def do_POST(self) -> None:
        if self._from_web_page():
            return
        try:
            self._post()
        except TimeoutError:  # the body never came: the connection is closed
            self.close_connection = True
        except Exception as exc:
            log.exception("http: POST %s failed", self.path)
            self._json(500, {"error": f"internal error ({type(exc).__name__}); see the log"})

    def _devices(self) -> None:
        """The fleet, or with ``?limit=N[&after=ID]`` one page of it and where the next
        begins (``next``: the id to pass as ``after``; null on the last page)."""
        query = parse_qs(urlsplit(self.path).query)
        raw_limit, after = query.get("limit", [""])[0], query.get("after", [""])[0]
        if raw_limit and (not raw_limit.isdigit() or not 1 <= int(raw_limit) <= MAX_PAGE):
            self._json(400, {"error": f"limit must be 1-{MAX_PAGE}, got {raw_limit[:20]!r}"})
            return
        limit = int(raw_limit) if raw_limit else None
        devices = read_devices(self.state.db_path, None if limit is None else limit + 1, after)
        more = limit is not None and len(devices) > limit
        page = devices[:limit] if limit is not None else devices
        body: dict[str, Any] = {"devices": [d.as_json() for d in page]}
        if limit is not None:
            body["next"] = page[-1].device_id if more else None
        self._json(200, body)

    def _not_allowed(self) -> None:
        self.close_connection = True
        body = json.dumps(
            {"error": f"{self.command} is not allowed; use GET, HEAD or POST"}
        ).encode()
        self.send_response(405)
        self.send_header("Allow", "GET, HEAD, POST")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_HEAD = do_GET  # noqa: N815 (http.server's names)
    do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _not_allowed  # noqa: N815 (http.server's names)

    def _get(self) -> None:
        path = self.path.split("?", 1)[0]
        try:
            if path == "/healthz":
                self._json(200, {"status": "ok", "mqtt_connected": self.state.mqtt_connected()})
            elif path == "/metrics":
                self._send(200, _metrics(self.state).encode(), "text/plain; version=0.0.4")
            elif path == "/v1/devices":
                self._devices()
            elif path == "/v1/jobs" and self.state.jobs is not None:
                self._json(200, {"jobs": self.state.jobs.jobs_json()})
            elif path.startswith("/v1/jobs/") and self.state.jobs is not None:
                job = self.state.jobs.job_json(path.removeprefix("/v1/jobs/"))
                if job is None:
                    self._json(404, {"error": f"no job {path.removeprefix('/v1/jobs/')!r}"})
                else:
                    self._json(200, job)
            elif path == "/v1/signing-key":
                key = read_public_key(self.state.db_path.parent)
                self._json(200, {"algorithm": "ed25519", "public_key": key_text(key)})
            elif path == "/v1/rollouts" and self.state.rollouts is not None:
                self._json(200, {"rollouts": self.state.rollouts.rollouts_json()})
            elif path.startswith("/v1/rollouts/") and self.state.rollouts is not None:
                rollout = self.state.rollouts.rollout_json(path.removeprefix("/v1/rollouts/"))
                if rollout is None:
                    self._json(404, {"error": f"no rollout {path.removeprefix('/v1/rollouts/')!r}"})
                else:
                    self._json(200, rollout)
            elif path == "/v1/rejections":
                counts = read_rejections(self.state.db_path)
                rows = [{"channel": c, "reason": r, "count": n} for (c, r), n in counts.items()]
                self._json(200, {"rejections": rows})
            else:
                self._json(
                    404,
                    {"error": f"no such endpoint {path}", "see": "/healthz, /metrics, /v1/devices"},
                )
        except StoreError as exc:
            self._json(503, {"error": str(exc)})

    def _post(self) -> None:
        path = self.path.split("?", 1)[0]
        jobs, rollouts = self.state.jobs, self.state.rollouts
        action: Callable[[object], dict[str, Any]] | None = None
        if path == "/v1/jobs" and jobs is not None:
            action = jobs.create_json
        elif path == "/v1/rollouts" and rollouts is not None:
            action = rollouts.create
        elif path.startswith("/v1/rollouts/") and rollouts is not None:
            rollout_id, _, verb = path.removeprefix("/v1/rollouts/").partition("/")

            def action(_: object) -> dict[str, Any]:
                assert rollouts is not None
                return rollouts.steer(rollout_id, verb)

        if action is None:
            self._json(404, {"error": f"no such endpoint POST {path}"})
            return
        raw_length = self.headers.get("Content-Length") or "0"
        if not raw_length.isdigit():  # (isdigit: no sign, no spaces)
            self.close_connection = True
            self._json(400, {"error": f"bad Content-Length {raw_length[:40]!r}"})
            return
        length = int(raw_length)
        if length > 1 << 20:
            self._json(413, {"error": "request body larger than 1 MiB"})
            return
        try:
            body = json.loads(self.rfile.read(length) or b"null")
        except ValueError as exc:
            self._json(400, {"error": f"body is not JSON: {exc}"})
            return
        try:
            self._json(201 if path in ("/v1/jobs", "/v1/rollouts") else 200, action(body))
        except KeyError as exc:
            self._json(404, {"error": f"no rollout {exc.args[0]!r}"})
        except ValueError as exc:  # (409 for a rollout that conflicts with one deciding)
            self._json(getattr(exc, "http_status", 400), {"error": str(exc)})
        except OverflowError as exc:  # a JSON number too large for its field
            self._json(400, {"error": f"a number is out of range: {exc}"})
        except StoreError as exc:
            self._json(503, {"error": str(exc)})


def _finite(value: Any) -> Any:
    """`value` with every NaN or infinite float inside it replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


#: Devices one page of ``/v1/devices`` holds at most.
MAX_PAGE = 10_000
#: Seconds a connection may sit idle (or a request body take to arrive) before it is closed.
IDLE_TIMEOUT_S = 30.0
#: Connections served at once; one more is answered 503 and closed.
MAX_CONNECTIONS = 64
_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
         b"Connection: close\r\nContent-Length: 40\r\n\r\n"
         b'{"error": "too many connections; retry"}')  # fmt: skip


class _BoundedServer(ThreadingHTTPServer):
    """A thread per connection, at most `MAX_CONNECTIONS` of them."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        super().__init__(address, handler)
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            try:
                request.settimeout(1.0)
                request.sendall(_BUSY)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class ApiServer:
    """Serves the API on a background thread until `stop`."""

    def __init__(self, host: str, port: int, state: ApiState) -> None:
        handler = type("Handler", (_Handler,), {"state": state, "timeout": IDLE_TIMEOUT_S})
        self._server = _BoundedServer((host, port), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="http-api", daemon=True
        )

    @property
    def port(self) -> int:
        """The bound port (useful when 0 was asked for)."""
        return int(self._server.server_address[1])

    def start(self) -> None:
        """Start serving."""
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and close the socket."""
        if self._thread.is_alive():
            self._server.shutdown()
        self._server.server_close()
