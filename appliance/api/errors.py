"""The one place where failures become the error body of DESIGN §11."""

from __future__ import annotations

import logging

import peewee
from flask import Flask, g, jsonify
from werkzeug.exceptions import HTTPException

from appliance.api.routing import audit_denial
from appliance.errors import STATUS_BY_CODE, AnimusError, Forbidden, Hidden

log = logging.getLogger("appliance.api")

_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}
STATUS_BY_CODE.setdefault("method_not_allowed", 405)


def error_response(code: str, message: str, status: int, details: dict | None = None):
    body = {
        "error": code,
        "message": message,
        "details": details or {},
        "request_id": g.get("request_id", ""),
    }
    return jsonify(body), status


def init_app(app: Flask) -> None:
    @app.errorhandler(AnimusError)
    def animus_error(error: AnimusError):
        if isinstance(error, Forbidden | Hidden):
            audit_denial(error)
        return error_response(error.code, error.message, error.status, error.details)

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException):
        status = error.code or 500
        code = _HTTP_CODES.get(status, "invalid_request" if status < 500 else "internal_error")
        return error_response(code, error.description or error.name, status)

    @app.errorhandler(peewee.IntegrityError)
    def integrity_error(error: peewee.IntegrityError):
        if "immutable" in str(error):
            return error_response("immutable", "the record is immutable", 409)
        log.exception("integrity error")
        return error_response("conflict", "the change conflicts with stored records", 409)

    @app.errorhandler(peewee.OperationalError)
    def database_unavailable(error: peewee.OperationalError):
        log.exception("database error")
        return error_response("unavailable", "the database is unavailable; retry shortly", 503)

    @app.errorhandler(Exception)
    def unexpected(error: Exception):
        log.exception("unhandled error")
        return error_response("internal_error", "an internal error occurred", 500)
