"""Request validation and the OpenAPI 3.1 schema of ``holst serve``, from one field table.

Every request field is declared once in :data:`GENERATE_FIELDS`; :func:`parse_generate_request`
validates against it and :func:`openapi_schema` describes it, so the two cannot drift apart.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from holst.config import ServeConfig


class RequestError(Exception):
    """A request the server refuses; ``status`` is the HTTP code, the message names the problem."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclasses.dataclass(frozen=True)
class Field:
    """One JSON field: type ('string' | 'integer' | 'number'), bounds, whether null is allowed."""

    type: str
    description: str
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    nullable: bool = True


GENERATE_FIELDS: dict[str, Field] = {
    "prompt": Field("string", "the caption (required, non-empty)", nullable=False),
    "num_images": Field("integer", "images to sample (default: the model's)", 1, None),
    "top_k": Field("integer", "keep the k most likely codes per step; 0 = off", 0, None),
    "top_p": Field("number", "nucleus probability mass; 1 = off", 0, 1, exclusive_minimum=True),
    "temperature": Field("number", "sampling temperature", 0, 100, exclusive_minimum=True),
    "guidance_scale": Field("number", "classifier-free guidance weight; null or 1 = off", 0, 100,
                            exclusive_minimum=True),
    "seed": Field("integer", "image i uses seed + i; null = random seeds (returned)", 0, 2**62),
    "rerank": Field("integer", "keep the best k images; 0 = all (sorted best first)", 0, None),
    "upscale": Field("integer", "upscaling factor; 1 = none", 1, None),
}


@dataclasses.dataclass
class GenerateRequest:
    """A validated generate request; ``None`` fields take the model's defaults."""

    prompt: str
    num_images: int | None = None
    top_k: int | None = None
    top_p: float | None = None
    temperature: float | None = None
    guidance_scale: float | None = None
    seed: int | None = None
    rerank: int | None = None
    upscale: int | None = None


def _limits(config: ServeConfig) -> dict[str, tuple[float | None, float | None]]:
    """Per-server upper bounds that tighten the field table."""
    return {"num_images": (None, config.max_images_per_request), "rerank": (None, config.max_images_per_request),
            "upscale": (None, config.max_upscale)}


def parse_generate_request(body: bytes, config: ServeConfig) -> GenerateRequest:
    """Validate a JSON body against :data:`GENERATE_FIELDS` and the server's limits.

    Raises:
        RequestError 400 (not JSON / not an object), 422 (a field is unknown, of the wrong type or out of range).
    """
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RequestError(400, f"body is not valid UTF-8 JSON: {e}") from None
    if not isinstance(data, dict):
        raise RequestError(400, "body must be a JSON object, e.g. {\"prompt\": \"красное яблоко\"}")
    unknown = sorted(set(data) - set(GENERATE_FIELDS))
    if unknown:
        raise RequestError(422, f"unknown field(s) {unknown}; known fields: {sorted(GENERATE_FIELDS)}")
    if "prompt" not in data:
        raise RequestError(422, "field 'prompt' is required")
    limits = _limits(config)
    values: dict[str, Any] = {}
    for name, field in GENERATE_FIELDS.items():
        if name not in data:
            continue
        value = data[name]
        if value is None:
            if not field.nullable:
                raise RequestError(422, f"field {name!r} must not be null")
            continue
        values[name] = _check_value(name, value, field, limits.get(name, (None, None)))
    prompt = values["prompt"]
    if not prompt.strip():
        raise RequestError(422, "field 'prompt' is empty: give a caption describing the image")
    if len(prompt) > config.max_prompt_chars:
        raise RequestError(422, f"field 'prompt' has {len(prompt)} characters; this server accepts at most "
                                f"{config.max_prompt_chars}")
    if values.get("rerank") and values.get("num_images") and values["rerank"] > values["num_images"]:
        raise RequestError(422, f"rerank={values['rerank']} exceeds num_images={values['num_images']}")
    return GenerateRequest(**values)


def _check_value(name: str, value: Any, field: Field, limit: tuple[float | None, float | None]) -> Any:
    if field.type == "string":
        if not isinstance(value, str):
            raise RequestError(422, f"field {name!r} must be a string")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(422, f"field {name!r} must be a {field.type}")
    if field.type == "integer":
        if isinstance(value, float) and not value.is_integer():
            raise RequestError(422, f"field {name!r} must be an integer, got {value}")
        value = int(value)
    else:
        value = float(value)
    lo = field.minimum
    hi = field.maximum if limit[1] is None else (limit[1] if field.maximum is None else min(field.maximum, limit[1]))
    if lo is not None and (value <= lo if field.exclusive_minimum else value < lo):
        raise RequestError(422, f"field {name!r}={value} must be {'>' if field.exclusive_minimum else '>='} {lo}")
    if hi is not None and value > hi:
        raise RequestError(422, f"field {name!r}={value} must be <= {hi} on this server")
    return value


def _field_schema(field: Field, limit: tuple[float | None, float | None]) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": [field.type, "null"] if field.nullable else field.type,
                              "description": field.description}
    if field.minimum is not None:
        schema["exclusiveMinimum" if field.exclusive_minimum else "minimum"] = field.minimum
    hi = field.maximum if limit[1] is None else (limit[1] if field.maximum is None else min(field.maximum, limit[1]))
    if hi is not None:
        schema["maximum"] = hi
    if field.type == "string" and not field.nullable:
        schema["minLength"] = 1
    return schema


def openapi_schema(config: ServeConfig, version: str) -> dict[str, Any]:
    """The OpenAPI 3.1 document served at ``/openapi.json``."""
    limits = _limits(config)
    props = {name: _field_schema(f, limits.get(name, (None, None))) for name, f in GENERATE_FIELDS.items()}
    props["prompt"]["maxLength"] = config.max_prompt_chars
    image = {"type": "object", "properties": {
        "url": {"type": "string", "description": "GET it for the PNG (an unguessable capability URL)"},
        "seed": {"type": "integer"}, "perplexity": {"type": "number"},
        "clip_score": {"type": ["number", "null"]}, "width": {"type": "integer"}, "height": {"type": "integer"}}}
    result = {"type": "object", "properties": {
        "id": {"type": "string"}, "prompt": {"type": "string"}, "settings": {"type": "object"},
        "images": {"type": "array", "items": {"$ref": "#/components/schemas/Image"}},
        "grid_url": {"type": "string"}, "elapsed_s": {"type": "number"},
        "warnings": {"type": "array", "items": {"type": "string"}, "description": "e.g. the caption was cut"}}}
    error = {"type": "object", "properties": {"error": {"type": "string"}, "status": {"type": "integer"}}}
    err = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    busy = {"description": "the queue is full; retry after the Retry-After header's seconds", **err}
    req_ref = {"$ref": "#/components/schemas/GenerateRequest"}
    body = {"required": True, "content": {"application/json": {"schema": req_ref}}}
    common = {"400": {"description": "body is not a JSON object", **err},
              "401": {"description": "missing or wrong bearer token", **err},
              "413": {"description": f"body over {config.max_body_bytes} bytes", **err},
              "422": {"description": "a field is invalid (the message names it)", **err},
              "503": busy}
    return {
        "openapi": "3.1.0",
        "info": {"title": "holst text-to-image", "version": version,
                 "description": "Generate images from captions. Requests that arrive together share one batch."},
        "components": {
            "schemas": {"GenerateRequest": {"type": "object", "required": ["prompt"], "properties": props,
                                            "additionalProperties": False},
                        "Image": image, "GenerateResult": result, "Error": error},
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}] if config.token else [],
        "paths": {
            "/v1/generate": {"post": {
                "summary": "generate images; JSON result, or the best image as PNG with Accept: image/png",
                "requestBody": body,
                "responses": {"200": {"description": "done", "content": {
                    "application/json": {"schema": {"$ref": "#/components/schemas/GenerateResult"}},
                    "image/png": {"schema": {"type": "string", "format": "binary"}}}},
                    "504": {"description": "not finished within the request timeout", **err}, **common}}},
            "/v1/generate/stream": {"post": {
                "summary": "server-sent events: queued, preview (partial images as PNG data URLs), result, error",
                "requestBody": body,
                "responses": {"200": {"description": "an event stream", "content": {"text/event-stream": {}}},
                              **common}}},
            "/v1/images/{image_id}.png": {"get": {
                "summary": "a generated image (kept for the last max_stored_images images)",
                "parameters": [{"name": "image_id", "in": "path", "required": True, "schema": {"type": "string"}}],
                "security": [],
                "responses": {"200": {"description": "PNG", "content": {"image/png": {}}},
                              "404": {"description": "unknown or expired", **err}}}},
            "/health": {"get": {"summary": "liveness, queue depth, model and limits", "security": [],
                                "responses": {"200": {"description": "ok",
                                                      "content": {"application/json": {}}}}}},
            "/openapi.json": {"get": {"summary": "this document", "security": [],
                                      "responses": {"200": {"description": "ok"}}}},
            "/": {"get": {"summary": "the web page", "security": [], "responses": {"200": {"description": "HTML"}}}},
        },
    }
