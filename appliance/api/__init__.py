"""The JSON API under /api/v1: blueprints, error format, request ids, idempotency."""

from __future__ import annotations

from flask import Flask


def init_app(app: Flask) -> None:
    from appliance.api import (
        audit,
        code,
        dataplane,
        datasets,
        errors,
        identity,
        models,
        openapi,
        pipelines,
        projects,
        runs,
        sessions,
    )

    for module in (
        projects,
        datasets,
        code,
        runs,
        pipelines,
        identity,
        audit,
        dataplane,
        models,
        sessions,
        openapi,
    ):
        app.register_blueprint(module.bp)
    errors.init_app(app)
