"""The OpenAPI 3.1 document served at `/openapi.json`, written by hand to match `http_api`.

Why by hand: the API is small, and a hand-written document states the limits (max_tokens, body
size, which fields are accepted only with their neutral value) exactly as the server enforces them;
the schemathesis test in tests/test_http.py keeps the two in step.
"""

from __future__ import annotations

from typing import Any

from ..steering.generate import STOP_RULES, GenerationOptions

JSON = "application/json"


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": {"$ref": "#/components/schemas/Error"}}}}


def _nullable(schema: dict[str, Any]) -> dict[str, Any]:
    return {"anyOf": [schema, {"type": "null"}]}


def openapi_document(max_tokens_limit: int, max_body_bytes: int, secured: bool = False) -> dict[str, Any]:
    """The document for an app with these limits (`secured`: a bearer token is required)."""
    auth_errors = {"401": _error("Missing or wrong bearer token.")} if secured else {}
    common = {**auth_errors, "403": _error("Host header not allowed (DNS-rebinding protection).")}
    body_errors = {
        "400": _error("Invalid request: the message names the field."),
        "413": _error(f"Request body larger than {max_body_bytes} bytes."),
        "415": _error("Content-Type is not application/json."),
    }
    steering_entry = {
        "type": "object",
        "required": ["feature"],
        "additionalProperties": False,
        "properties": {
            "feature": {
                "type": "string",
                "description": '"<sae>:<index>" (e.g. "default:123") or "vector:<name>"',
                "examples": ["default:123"],
            },
            "strength": {
                "type": "number",
                "minimum": -20,
                "maximum": 20,
                "default": 0,
                "description": "1 = the feature's max activation; for ablate, the fraction removed (0..1)",
            },
            "mode": {"type": "string", "enum": ["add", "clamp", "ablate"], "default": "add"},
            "layer": {"type": "integer", "minimum": 0, "description": "default: the SAE's own layer"},
        },
    }
    completion_request = {
        "type": "object",
        "required": ["prompt"],
        "additionalProperties": False,
        "properties": {
            "model": _nullable(
                {"type": "string", "description": "accepted for compatibility; the loaded model answers"}
            ),
            "prompt": {
                "anyOf": [
                    {"type": "string"},
                    {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 1},
                ]
            },
            "max_tokens": _nullable({"type": "integer", "minimum": 1, "maximum": max_tokens_limit, "default": 16}),
            "temperature": _nullable({"type": "number", "minimum": 0, "maximum": 2, "default": 1}),
            "top_p": _nullable({"type": "number", "exclusiveMinimum": 0, "maximum": 1, "default": 1}),
            "stop": _nullable(
                {
                    "anyOf": [
                        {"type": "string", "minLength": 1},
                        {"type": "array", "items": {"type": "string", "minLength": 1}, "maxItems": 4},
                    ]
                }
            ),
            "stream": _nullable({"type": "boolean", "default": False}),
            "stream_options": _nullable(
                {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"include_usage": {"type": "boolean"}},
                }
            ),
            "seed": _nullable({"type": "integer", "minimum": 0, "maximum": 2**63 - 1}),
            "n": _nullable({"type": "integer", "enum": [1]}),
            "best_of": _nullable({"type": "integer", "enum": [1]}),
            "echo": _nullable({"type": "boolean", "enum": [False]}),
            "logprobs": _nullable({"type": "integer", "enum": [0]}),
            "suffix": {"type": "null"},
            "presence_penalty": _nullable({"type": "number", "enum": [0]}),
            "frequency_penalty": _nullable({"type": "number", "enum": [0]}),
            "logit_bias": _nullable({"type": "object", "maxProperties": 0}),
            "user": {"description": "ignored"},
            "steering": _nullable(
                {
                    "anyOf": [
                        {
                            "type": "array",
                            "items": {"$ref": "#/components/schemas/SteeringEntry"},
                            "maxItems": 32,
                        },
                        {
                            "type": "string",
                            "enum": ["editor"],
                            "description": "use the editor's current steering",
                        },
                    ]
                }
            ),
            "repetition_penalty": _nullable(
                {
                    "type": "number",
                    "minimum": 1,
                    "maximum": 2,
                    "default": GenerationOptions().repetition_penalty,
                    "description": "tinymorph extension: damp the logits of recently generated tokens (1 = off)",
                }
            ),
            "stop_rule": _nullable(
                {
                    "type": "string",
                    "enum": list(STOP_RULES),
                    "default": "none",
                    "description": "tinymorph extension: also stop at a word/line/sentence/paragraph boundary",
                }
            ),
        },
    }
    timings = {
        "type": "object",
        "properties": {
            k: {"type": "number"}
            for k in (
                "queue_ms",
                "prefill_ms",
                "ttft_ms",
                "decode_ms",
                "total_ms",
                "tokens_reused",
                "tokens_prefilled",
                "tokens_generated",
                "decode_tokens_per_s",
            )
        },
    }
    extension = {
        "type": "object",
        "required": ["stop_reason", "timings", "steering"],
        "properties": {
            "stop_reason": {"type": "string"},
            "timings": timings,
            "steering": {"type": "array", "items": {"type": "object"}},
        },
    }
    usage = {
        "type": "object",
        "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
        "properties": {k: {"type": "integer"} for k in ("prompt_tokens", "completion_tokens", "total_tokens")},
    }
    choice = {
        "type": "object",
        "required": ["text", "index", "finish_reason"],
        "properties": {
            "text": {"type": "string"},
            "index": {"type": "integer"},
            "logprobs": {"type": "null"},
            "finish_reason": _nullable({"type": "string", "enum": ["stop", "length"]}),
        },
    }
    completion = {
        "type": "object",
        "required": ["id", "object", "created", "model", "choices", "usage", "tinymorph"],
        "properties": {
            "id": {"type": "string"},
            "object": {"const": "text_completion"},
            "created": {"type": "integer"},
            "model": {"type": "string"},
            "choices": {"type": "array", "items": choice, "minItems": 1},
            "usage": usage,
            "tinymorph": extension,
        },
    }
    steering_body = {
        "type": "object",
        "required": ["steering"],
        "additionalProperties": False,
        "properties": {
            "steering": {
                "type": "array",
                "items": {"$ref": "#/components/schemas/SteeringEntry"},
                "maxItems": 32,
            }
        },
    }
    health = {
        "type": "object",
        "required": ["state", "message"],
        "properties": {
            "state": {"type": "string", "enum": ["idle", "loading", "ready", "error"]},
            "message": {"type": "string"},
            "model": {"type": "string"},
        },
    }
    # OpenAPI 3.1: the schema of a text/event-stream response describes one event
    sse_event = {
        "type": "object",
        "required": ["data"],
        "properties": {
            "data": {
                "type": "string",
                "description": "a text_completion chunk as JSON (the last one carries finish_reason and the "
                "tinymorph field), or [DONE] at the end",
            },
            "event": {"type": "string"},
        },
    }
    models = {
        "type": "object",
        "required": ["object", "data"],
        "properties": {
            "object": {"const": "list"},
            "data": {
                "type": "array",
                "items": {
                    "type": "object",
                    "required": ["id", "object", "created", "owned_by"],
                    "properties": {
                        "id": {"type": "string"},
                        "object": {"const": "model"},
                        "created": {"type": "integer"},
                        "owned_by": {"type": "string"},
                        "ready": {"type": "boolean"},
                    },
                },
            },
        },
    }
    feature_unavailable = _error("Feature search not available (no SAE or no labels installed).")
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "tinymorph",
            "version": "0.1.0",
            "description": "Local prose continuation with SAE steering. OpenAI-compatible /v1/completions.",
        },
        "paths": {
            "/v1/completions": {
                "post": {
                    "summary": "Continue a prompt (OpenAI completions; `stream: true` answers with SSE)",
                    "operationId": "createCompletion",
                    "requestBody": {"required": True, "content": {JSON: {"schema": completion_request}}},
                    "responses": {
                        "200": {
                            "description": "The completion, or SSE chunks ending with `data: [DONE]`",
                            "content": {
                                JSON: {"schema": completion},
                                "text/event-stream": {"schema": sse_event},
                            },
                        },
                        **body_errors,
                        **common,
                        "429": _error("Too many requests in flight."),
                        "503": _error("Model not loaded yet (see /healthz), or steering not available."),
                    },
                }
            },
            "/v1/steering": {
                "get": {
                    "summary": "The editor's steering plan",
                    "operationId": "getSteering",
                    "responses": {
                        "200": {
                            "description": "Current entries",
                            "content": {JSON: {"schema": steering_body}},
                        },
                        **common,
                    },
                },
                "put": {
                    "summary": "Replace the editor's steering plan (validated against the loaded model)",
                    "operationId": "putSteering",
                    "requestBody": {"required": True, "content": {JSON: {"schema": steering_body}}},
                    "responses": {
                        "200": {
                            "description": "The new entries",
                            "content": {JSON: {"schema": steering_body}},
                        },
                        **body_errors,
                        **common,
                        "503": _error("Steering not available (SAE cannot be loaded)."),
                    },
                },
            },
            "/v1/features": {
                "get": {
                    "summary": "Search features by their labels",
                    "operationId": "searchFeatures",
                    "parameters": [
                        {"name": "q", "in": "query", "schema": {"type": "string", "maxLength": 200}},
                        {
                            "name": "limit",
                            "in": "query",
                            "schema": {"type": "integer", "minimum": 1, "maximum": 100, "default": 20},
                        },
                    ],
                    "responses": {
                        "200": {
                            "description": "Best matches first",
                            "content": {
                                JSON: {
                                    "schema": {
                                        "type": "object",
                                        "required": ["features"],
                                        "properties": {"features": {"type": "array", "items": {"type": "object"}}},
                                    }
                                }
                            },
                        },
                        "400": _error("Bad query parameter."),
                        **common,
                        "503": feature_unavailable,
                    },
                }
            },
            "/v1/features/{feature_id}": {
                "get": {
                    "summary": "Everything known about one feature",
                    "operationId": "showFeature",
                    "parameters": [
                        {
                            "name": "feature_id",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "string", "examples": ["default:123"]},
                        }
                    ],
                    "responses": {
                        "200": {
                            "description": "Feature details",
                            "content": {JSON: {"schema": {"type": "object", "required": ["id"]}}},
                        },
                        "400": _error("Malformed feature id."),
                        "404": _error("No such feature or SAE."),
                        **common,
                        "503": feature_unavailable,
                    },
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics",
                    "operationId": "metrics",
                    "responses": {
                        "200": {
                            "description": "Prometheus text format 0.0.4",
                            "content": {"text/plain": {"schema": {"type": "string"}}},
                        },
                        **common,
                    },
                }
            },
            "/v1/models": {
                "get": {
                    "summary": "The model this server runs (OpenAI model list)",
                    "operationId": "listModels",
                    "responses": {
                        "200": {
                            "description": "One model; `ready` is false while it loads",
                            "content": {JSON: {"schema": models}},
                        },
                        **common,
                    },
                }
            },
            "/healthz": {
                "get": {
                    "summary": "Liveness and model state (no token needed)",
                    "operationId": "health",
                    "security": [],
                    "responses": {
                        "200": {"description": "Model loaded", "content": {JSON: {"schema": health}}},
                        "403": common["403"],
                        "503": {"description": "Loading or failed", "content": {JSON: {"schema": health}}},
                    },
                }
            },
            "/openapi.json": {
                "get": {
                    "summary": "This document",
                    "operationId": "openapi",
                    "responses": {
                        "200": {
                            "description": "OpenAPI 3.1",
                            "content": {JSON: {"schema": {"type": "object"}}},
                        },
                        **common,
                    },
                }
            },
        },
        "components": {
            "schemas": {
                "SteeringEntry": steering_entry,
                "Error": {
                    "type": "object",
                    "required": ["error"],
                    "properties": {
                        "error": {
                            "type": "object",
                            "required": ["message", "type"],
                            "properties": {
                                "message": {"type": "string"},
                                "type": {"type": "string"},
                                "param": _nullable({"type": "string"}),
                                "code": {},
                            },
                        }
                    },
                },
            }
        },
    }
    if secured:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        doc["security"] = [{"bearer": []}]
    return doc
