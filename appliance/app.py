"""``create_app(config)``: the Flask application factory of the control plane."""

from __future__ import annotations

import logging
import re
import secrets
import time

from flask import Flask, g, jsonify, request

from appliance import db, logs
from appliance.config import Config
from appliance.secrets.provider import FileSecretProvider
from appliance.storage.blobs import BlobStore

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
access_log = logging.getLogger("appliance.access")


def create_app(config: Config | None = None) -> Flask:
    """Build the control plane for ``config`` (default: from the environment)."""
    config = config or Config.from_env()
    logs.configure(config.log_level)
    app = Flask(__name__, static_folder=None)
    app.config["ANIMUS"] = config
    app.config["JSON_SORT_KEYS"] = False
    app.json.sort_keys = False
    app.extensions["animus.blobs"] = BlobStore(config.blob_dir, fsync=config.blob_fsync)
    app.extensions["animus.secrets"] = FileSecretProvider(config.secrets_dir)
    db.bind(db.open_database(config.effective_database_url))

    @app.before_request
    def begin_request():
        g.started = time.perf_counter()
        supplied = request.headers.get("X-Request-ID", "")
        g.request_id = supplied if _REQUEST_ID.match(supplied) else "req_" + secrets.token_hex(12)
        db.database.connect(reuse_if_open=True)

    @app.after_request
    def finish_request(response):
        response.headers["X-Request-ID"] = g.request_id
        response.headers.setdefault("Cache-Control", "no-store")
        response.headers["X-Content-Type-Options"] = "nosniff"
        principal = g.get("principal")
        access_log.info(
            "%s %s %s",
            request.method,
            request.path,
            response.status_code,
            extra={
                "fields": {
                    "request_id": g.request_id,
                    "method": request.method,
                    "path": request.path,
                    "status": response.status_code,
                    "duration_ms": round((time.perf_counter() - g.started) * 1000, 2),
                    "actor": principal.actor if principal else "anonymous",
                }
            },
        )
        return response

    @app.teardown_request
    def close_database(_exc):
        if not db.database.is_closed():
            db.database.close()

    @app.get("/healthz")
    def healthz():
        return jsonify({"status": "ok"})

    @app.get("/readyz")
    def readyz():
        checks = readiness(app)
        ready = all(c["ok"] for c in checks.values())
        return jsonify({"status": "ready" if ready else "not_ready", "checks": checks}), (
            200 if ready else 503
        )

    from appliance import api, ui

    api.init_app(app)
    ui.init_app(app)
    return app


def readiness(app: Flask) -> dict[str, dict]:
    """Whether the database answers at the newest schema and the blob store is writable."""
    checks: dict[str, dict] = {}
    try:
        newest = len(db.available_migrations())
        version = db.current_version()
        checks["database"] = {
            "ok": version == newest,
            "schema_version": version,
            "expected": newest,
        }
    except Exception as exc:  # any database failure means "not ready", with the reason
        checks["database"] = {"ok": False, "error": type(exc).__name__}
    blobs: BlobStore = app.extensions["animus.blobs"]
    try:
        probe = blobs.root / "tmp" / f".ready-{secrets.token_hex(4)}"
        probe.write_bytes(b"")
        probe.unlink()
        checks["blob_store"] = {"ok": True}
    except OSError as exc:
        checks["blob_store"] = {"ok": False, "error": exc.strerror or type(exc).__name__}
    return checks
