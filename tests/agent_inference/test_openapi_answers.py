"""The real service's answers against its own OpenAPI document: each answer matches the
schema documented for its status (a ``oneOf`` exactly one branch), and every status an
endpoint answers is documented."""

from __future__ import annotations

import http.client
import json
from typing import Any

import pytest

from agent.inference_service import InferenceService
from agent.openapi import OPENAPI
from tests.agent_inference.conftest import Bundles


def _resolve(schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        node: Any = OPENAPI
        for part in schema["$ref"].removeprefix("#/").split("/"):
            node = node[part]
        schema = node
    return schema


_TYPES: dict[str, Any] = {"object": dict, "array": list, "string": str, "boolean": bool,
                          "integer": int, "number": (int, float)}  # fmt: skip


def _errors(schema: dict[str, Any], value: Any, at: str = "$") -> list[str]:
    """What keeps `value` from matching `schema` (the subset of OpenAPI 3.0 the doc uses)."""
    schema = _resolve(schema)
    if value is None and schema.get("nullable"):
        return []
    out = []
    kind = schema.get("type")
    if kind and (not isinstance(value, _TYPES[kind]) or
                 (isinstance(value, bool) and kind in ("integer", "number"))):  # fmt: skip
        out.append(f"{at}: not {kind}")
    if "enum" in schema and value not in schema["enum"]:
        out.append(f"{at}: {value!r} not in {schema['enum']}")
    if isinstance(value, dict):
        out += [f"{at}: no {key}" for key in schema.get("required", []) if key not in value]
        for key, sub in schema.get("properties", {}).items():
            if key in value:
                out += _errors(sub, value[key], f"{at}.{key}")
    if isinstance(value, list) and "items" in schema:
        for i, item in enumerate(value):
            out += _errors(schema["items"], item, f"{at}[{i}]")
    for sub in schema.get("allOf", []):
        out += _errors(sub, value, at)
    if "oneOf" in schema:
        matched = [i for i, sub in enumerate(schema["oneOf"]) if not _errors(sub, value, at)]
        if len(matched) != 1:
            out.append(f"{at}: matches {len(matched)} of oneOf's branches")
    return out


def _call(service: InferenceService, method: str, path: str, body: Any = None,
          content_type: str = "application/json") -> tuple[int, Any]:  # fmt: skip
    assert service.server is not None
    conn = http.client.HTTPConnection("127.0.0.1", service.server.address.port, timeout=10)
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    conn.request(method, path, body=data, headers={"Content-Type": content_type})
    answer = conn.getresponse()
    raw = answer.read()
    conn.close()
    documented = OPENAPI["paths"][path][method.lower()]["responses"]
    status = str(answer.status)
    assert status in documented, f"{method} {path}: {status} not documented"
    if method == "HEAD":
        assert raw == b""
        return answer.status, None
    value = json.loads(raw)
    content = _resolve(documented[status]).get("content", {})
    if "application/json" in content:
        assert _errors(content["application/json"]["schema"], value) == [], (path, value)
    return answer.status, value


def test_every_answer_matches_its_documented_schema(
    service: InferenceService, bundles: Bundles
) -> None:
    status, one = _call(service, "POST", "/v1/predict", {"input": bundles.pixels[0].tolist()})
    assert (status, "prediction" in one) == (200, True)
    status, batch = _call(service, "POST", "/v1/predict", {"input": bundles.pixels[:3].tolist()})
    assert (status, len(batch["predictions"])) == (200, 3)
    status, stored = _call(service, "POST", "/v1/feedback",
                           {"prediction_id": one["prediction_id"], "label": 2})  # fmt: skip
    assert (status, stored["label_index"]) == (200, 2)
    assert _call(service, "GET", "/healthz")[1]["status"] == "ok"
    for path in ("/healthz", "/v1/model", "/metrics", "/openapi.json"):
        assert _call(service, "HEAD", path)[0] == 200


@pytest.mark.parametrize("path", ["/v1/predict", "/v1/feedback"])
def test_an_unsupported_content_type_is_a_documented_415(
    service: InferenceService, path: str
) -> None:
    assert _call(service, "POST", path, b"{}", "text/plain")[0] == 415
