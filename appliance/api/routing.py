"""Declaring API operations once: the Flask route, its request schema and its OpenAPI entry.

``operation`` registers a view on a blueprint and records what the OpenAPI document says
about it, so the document is generated from the same declarations that route and validate
requests and cannot drift from them.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import jsonschema
import peewee
from flask import Blueprint, Response, current_app, g, jsonify, request

from appliance import db
from appliance.audit import log as audit
from appliance.audit.actions import Action
from appliance.auth.identities import principal_for_token
from appliance.domain.context import ANONYMOUS, Context
from appliance.domain.records import IdempotencyRecord
from appliance.errors import AnimusError, Unauthenticated

JSON = "application/json"
MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,200}$")


@dataclass
class Operation:
    method: str
    rule: str  # Flask rule, e.g. /api/v1/projects/<project_id>
    endpoint: str
    summary: str
    tag: str
    body: dict | None = None  # JSON schema of a JSON request body
    upload: bool = False  # the body is a stream the view reads itself (not JSON)
    request_media: str | None = None  # the stream's media type, when not a dataset upload
    response: dict | None = None  # JSON schema of the success body
    status: int = 200
    public: bool = False
    idempotent: bool = False  # a creating POST that honours Idempotency-Key
    query: dict[str, dict] = field(default_factory=dict)  # query parameter -> schema
    produces: str = JSON
    errors: tuple[int, ...] = ()

    @property
    def openapi_path(self) -> str:
        return re.sub(r"<(?:[a-z]+:)?([a-z_]+)>", r"{\1}", self.rule)

    @property
    def path_params(self) -> list[str]:
        return re.findall(r"<(?:[a-z]+:)?([a-z_]+)>", self.rule)


#: Every declared operation, in declaration order.
OPERATIONS: list[Operation] = []


def context() -> Context:
    """The acting principal and request id of the current request."""
    return Context(principal=g.get("principal", ANONYMOUS), request_id=g.request_id)


def operation(
    bp: Blueprint, method: str, rule: str, *, summary: str, tag: str, **options: Any
) -> Callable:
    """Register ``view`` for ``method rule`` on ``bp`` and declare it for the OpenAPI document.

    The view receives path parameters, plus ``body`` (the validated JSON) when a body schema
    is declared. It returns a JSON-able value (sent with the declared status) or a Response.
    """

    def register(view: Callable) -> Callable:
        full_rule = (bp.url_prefix or "") + rule
        op = Operation(
            method=method,
            rule=full_rule,
            endpoint=f"{bp.name}.{view.__name__}",
            summary=summary,
            tag=tag,
            **options,
        )
        OPERATIONS.append(op)

        @functools.wraps(view)
        def handle(**params: Any):
            g.operation = op
            if not op.public:
                authenticate()
            if op.body is not None:
                params["body"] = read_json(op.body)
            if op.idempotent and request.headers.get("Idempotency-Key") is not None:
                return run_idempotent(op, view, params)
            result = view(**params)
            return result if isinstance(result, Response) else (jsonify(result), op.status)

        bp.add_url_rule(rule, view.__name__, handle, methods=[method])
        return view

    return register


def authenticate() -> None:
    header = request.headers.get("Authorization", "")
    scheme, _, secret = header.partition(" ")
    principal = principal_for_token(secret.strip()) if scheme.lower() == "bearer" else None
    if principal is None:
        raise Unauthenticated(
            "a valid API token is required: Authorization: Bearer <token>"
            if not header
            else "the API token is unknown, expired or revoked"
        )
    g.principal = principal


def read_json(schema: dict) -> Any:
    """The request's JSON body, size-limited and validated against ``schema``."""
    if request.mimetype != JSON:
        raise AnimusError(
            "the request body must be application/json", code="unsupported_media_type"
        )
    limit = current_app.config["ANIMUS"].max_json_bytes
    if request.content_length is not None and request.content_length > limit:
        raise AnimusError(f"the JSON body is larger than {limit} bytes", code="request_too_large")
    raw = request.stream.read(limit + 1)
    if len(raw) > limit:
        raise AnimusError(f"the JSON body is larger than {limit} bytes", code="request_too_large")
    g.raw_body = raw
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise AnimusError(f"the body is not valid JSON: {exc}", code="malformed_json") from None
    problems = [
        {"field": "/".join(map(str, e.absolute_path)) or "(body)", "problem": e.message}
        for e in sorted(
            jsonschema.Draft202012Validator(schema).iter_errors(body), key=lambda e: list(e.path)
        )
    ]
    if problems:
        raise AnimusError(
            "the request body does not match the schema",
            code="invalid_request",
            details={"errors": problems},
        )
    return body


# --- Idempotency-Key (DESIGN §11) ---------------------------------------------------------------


class _KeyTaken(Exception):
    """Another request with the same key committed first."""


def _fingerprint(op: Operation) -> str:
    digest = hashlib.sha256(f"{op.method} {request.path}\n".encode())
    if op.upload:
        digest.update(f"{request.content_type}\n{request.content_length}".encode())
    else:
        digest.update(g.get("raw_body", b""))
    return digest.hexdigest()


def _replay(record: IdempotencyRecord, fingerprint: str) -> Response:
    if record.fingerprint != fingerprint:
        raise AnimusError(
            "this Idempotency-Key was used for a different request",
            code="idempotency_key_reused",
        )
    response = current_app.response_class(record.body, status=record.status, mimetype=JSON)
    response.headers["Idempotent-Replayed"] = "true"
    return response


def run_idempotent(op: Operation, view: Callable, params: dict) -> Response:
    key = request.headers["Idempotency-Key"]
    if not _IDEMPOTENCY_KEY.match(key):
        raise AnimusError(
            "Idempotency-Key must be 1-200 printable ASCII characters", code="invalid_request"
        )
    principal = g.principal.actor
    fingerprint = _fingerprint(op)
    where = (IdempotencyRecord.principal == principal) & (IdempotencyRecord.key == key)
    found = IdempotencyRecord.get_or_none(where)
    if found is not None:
        return _replay(found, fingerprint)
    g.idempotency = (principal, key, fingerprint)
    try:
        if op.upload:
            # The view stages its upload first and remembers its response inside the domain's
            # transaction, so a long upload never holds the database's write lock.
            result = view(**params)
        else:
            with db.write_transaction():
                _claim(principal, key)
                result = view(**params)
                remember(result)
    except _KeyTaken:
        return _replay(IdempotencyRecord.get(where), fingerprint)
    return result if isinstance(result, Response) else (jsonify(result), op.status)


def _claim(principal: str, key: str) -> None:
    """Inside the transaction: wait for any concurrent request with this key, then re-check."""
    if db.dialect() == "postgresql":
        lock = int.from_bytes(hashlib.sha256(f"{principal}\0{key}".encode()).digest()[:8], "big")
        db.database.execute_sql("SELECT pg_advisory_xact_lock(%s)", (lock - (1 << 63),))
    # On SQLite the transaction is IMMEDIATE: a concurrent request has committed already.
    if IdempotencyRecord.get_or_none(
        (IdempotencyRecord.principal == principal) & (IdempotencyRecord.key == key)
    ):
        raise _KeyTaken()


def remember(result: Any) -> None:
    """Store ``result`` as the answer to this request's Idempotency-Key, in the open transaction."""
    pending = g.pop("idempotency", None)
    if pending is None:
        return
    principal, key, fingerprint = pending
    if g.operation.upload:
        _claim(principal, key)
    op: Operation = g.operation
    try:
        with db.database.atomic():
            IdempotencyRecord.create(
                principal=principal,
                key=key,
                method=op.method,
                path=request.path,
                fingerprint=fingerprint,
                status=op.status,
                body=json.dumps(result, separators=(",", ":")),
            )
    except peewee.IntegrityError:
        raise _KeyTaken() from None


# --- denials ----------------------------------------------------------------------------------


def audit_denial(error: AnimusError) -> None:
    """Record a refused mutation by an authenticated caller, in a transaction of its own."""
    principal = g.get("principal")
    if request.method not in MUTATING or principal is None or not principal.authenticated:
        return
    with db.write_transaction():
        audit.record(
            context(),
            Action.REQUEST_DENIED,
            project_id=(request.view_args or {}).get("project_id"),
            object_type="request",
            object_id=f"{request.method} {request.path}",
            payload={"status": error.status, "code": error.code},
        )
