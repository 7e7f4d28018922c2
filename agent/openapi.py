"""The OpenAPI 3 document of the agent's local inference API (served at ``/openapi.json``)."""

from __future__ import annotations

from typing import Any

from protocols import __version__

_ERROR = {"$ref": "#/components/schemas/Error"}
_BODY_TYPES = ("application/json", "application/msgpack")


def _content(schema: dict[str, Any]) -> dict[str, Any]:
    return {kind: {"schema": schema} for kind in _BODY_TYPES}


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": _content(_ERROR)}


_ROW = {
    "type": "object",
    "required": ["prediction", "class_index", "confidence", "prediction_id"],
    "properties": {
        "prediction": {"type": "string", "description": "the top class's label"},
        "class_index": {"type": "integer"},
        "confidence": {"type": "number", "description": "softmax probability of the top class"},
        "prediction_id": {"type": "string", "description": "what /v1/feedback takes"},
    },
}
_DEFAULT = {"$ref": "#/components/responses/Refused"}
_HEALTH = {
    "type": "object",
    "required": ["status", "model"],
    "properties": {
        "status": {"type": "string", "enum": ["ok", "no_model"]},
        "model": {"type": "string", "nullable": True, "description": "the served model"},
        "version": {"type": "string", "description": "the serving version (when ok)"},
    },
}
_MODEL_REF = {
    "model": {"type": "string"},
    "version": {"type": "string"},
}

OPENAPI: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {
        "title": "fedge-agent local inference API",
        "version": __version__,
        "description": "Served by fedge-agent on loopback or a Unix socket. Bodies are JSON "
        "or msgpack, chosen by Content-Type (none: JSON); the answer uses the request's "
        "format. GET endpoints answer HEAD too. On TCP, requests from web pages (an Origin "
        "or Sec-Fetch-Site of another site, or a Host that is not localhost or an IP "
        "address) are refused with 403.",
    },
    "paths": {
        "/v1/predict": {
            "post": {
                "summary": "Predict one sample or a batch with the serving model version",
                "requestBody": {
                    "required": True,
                    "content": _content({"$ref": "#/components/schemas/PredictRequest"}),
                },
                "responses": {
                    "200": {
                        "description": "the prediction(s)",
                        "content": _content({"$ref": "#/components/schemas/PredictResponse"}),
                    },
                    "400": _error(
                        "input does not match the model's input schema, holds something "
                        "other than numbers (true and false included: send 1 and 0), NaN or "
                        "Inf, or more rows than inference_max_batch"
                    ),
                    "413": _error(
                        "body larger than a batch of inference_max_batch rows can need "
                        "(about 9 bytes a number in msgpack, 40 in JSON), or over 64 MiB"
                    ),
                    "415": _error("unsupported content type"),
                    "503": _error("no model loaded yet"),
                },
            }
        },
        "/v1/model": {
            "get": {
                "summary": "The serving model, its version, and the previous (standby) one",
                "responses": {
                    "200": {
                        "description": "model information",
                        "content": {
                            "application/json": {"schema": {"$ref": "#/components/schemas/Model"}}
                        },
                    }
                },
            }
        },
        "/v1/feedback": {
            "post": {
                "summary": "Label an earlier prediction; the row becomes local training data",
                "description": "One training row per prediction: labelling the same "
                "prediction again replaces its label (the last one given counts; "
                "``replaced`` says so) while its row is still kept. A batch's rows are "
                "labelled one at a time, by their own ids (``<id>.<row>``).",
                "requestBody": {
                    "required": True,
                    "content": _content({"$ref": "#/components/schemas/FeedbackRequest"}),
                },
                "responses": {
                    "200": {
                        "description": "stored",
                        "content": _content({"$ref": "#/components/schemas/FeedbackResponse"}),
                    },
                    "400": _error(
                        "bad label, the id of a whole batch (label its rows), or an input "
                        "holding NaN or Inf"
                    ),
                    "404": _error("unknown or expired prediction id"),
                    "413": _error("body over 64 KiB"),
                    "415": _error("unsupported content type"),
                },
            }
        },
        "/v1/rollback": {
            "post": {
                "summary": "Serve the previous version again (a request body, of any content "
                "type, is not read)",
                "responses": {
                    "200": {
                        "description": "rolled back",
                        "content": _content({"$ref": "#/components/schemas/Model"}),
                    },
                    "503": _error("no previous version"),
                },
            }
        },
        "/healthz": {
            "get": {
                "summary": "Ready when a model version is serving",
                "responses": {
                    "200": {
                        "description": "serving",
                        "content": {"application/json": {"schema": _HEALTH}},
                    },
                    "503": {
                        "description": "no model loaded yet",
                        "content": {"application/json": {"schema": _HEALTH}},
                    },
                },
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics (text format 0.0.4)",
                "responses": {
                    "200": {
                        "description": "metrics",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
        "/openapi.json": {
            "get": {"summary": "This document", "responses": {"200": {"description": "OpenAPI"}}}
        },
    },
    "components": {
        "responses": {
            "Refused": _error(
                "403 (a web page), 405 (another method: see Allow), 408 (request too slow), "
                "413 (body over 64 MiB), 414, 431, 501 (Transfer-Encoding), 503 (too many "
                "connections, with Retry-After), 505, or 500 (an internal error, logged)"
            )
        },
        "schemas": {
            "Error": {"type": "object", "properties": {"error": {"type": "string"}}},
            "Tensor": {
                "type": "object",
                "description": "msgpack only: raw little-endian bytes",
                "required": ["dtype", "shape", "data"],
                "properties": {
                    "dtype": {
                        "type": "string",
                        "enum": [
                            "float32",
                            "float64",
                            "float16",
                            "int64",
                            "int32",
                            "int8",
                            "uint8",
                        ],
                    },
                    "shape": {"type": "array", "items": {"type": "integer"}},
                    "data": {"type": "string", "format": "binary"},
                },
            },
            "PredictRequest": {
                "type": "object",
                "required": ["input"],
                "properties": {
                    "input": {
                        "description": "one sample (the input shape without the batch "
                        "dimension) or a batch, as nested lists of numbers or a Tensor",
                        "oneOf": [
                            {"type": "array", "items": {}},
                            {"$ref": "#/components/schemas/Tensor"},
                        ],
                    }
                },
            },
            "PredictResponse": {
                "description": "one sample: its row's fields; a batch: ``predictions``, a "
                "row per sample (each with its own prediction_id, ``<id>.<row>``)",
                "oneOf": [
                    {
                        "allOf": [
                            _ROW,
                            {
                                "type": "object",
                                "required": ["model", "version"],
                                "properties": _MODEL_REF,
                            },
                        ]
                    },
                    {
                        "type": "object",
                        "required": ["predictions", "model", "version"],
                        "properties": {
                            "predictions": {"type": "array", "items": _ROW},
                            **_MODEL_REF,
                        },
                    },
                ],
            },
            "FeedbackRequest": {
                "type": "object",
                "required": ["prediction_id", "label"],
                "properties": {
                    "prediction_id": {"type": "string"},
                    "label": {"oneOf": [{"type": "string"}, {"type": "integer"}]},
                },
            },
            "FeedbackResponse": {
                "type": "object",
                "required": ["stored", "rows", "label_index", "replaced"],
                "properties": {
                    "stored": {
                        "type": "boolean",
                        "description": "false when the agent keeps no feedback rows",
                    },
                    "rows": {"type": "integer", "description": "labelled rows kept now"},
                    "label_index": {"type": "integer", "description": "the label's class index"},
                    "replaced": {
                        "type": "boolean",
                        "description": "the prediction was labelled before: this label "
                        "replaced that one",
                    },
                },
            },
            "Model": {
                "type": "object",
                "properties": {
                    "model": {"type": "string", "nullable": True},
                    "version": {"type": "string", "nullable": True},
                    "previous_version": {"type": "string", "nullable": True},
                    "serving": {"type": "object", "nullable": True},
                    "versions": {"type": "object", "additionalProperties": {"type": "string"}},
                    "last_failure": {"type": "object", "nullable": True},
                },
            },
        },
    },
}
for _operations in OPENAPI["paths"].values():
    for _operation in _operations.values():
        _operation["responses"]["default"] = _DEFAULT
    if "get" in _operations:  # HEAD: the GET's status and headers, without the body
        _get = _operations["get"]
        _operations["head"] = {
            "summary": f"{_get['summary']} (headers only)",
            "responses": {
                status: {"description": answer.get("description", "")}
                for status, answer in _get["responses"].items()
                if status != "default"
            }
            | {"default": _DEFAULT},
        }
