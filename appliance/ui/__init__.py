"""The bundled web UI under /ui: server-rendered pages, no build step, works offline."""

from __future__ import annotations

from flask import Flask


def init_app(app: Flask) -> None:
    from appliance.ui import (  # noqa: F401 (importing registers the pages)
        admin,
        audit,
        models,
        projects,
        runs,
        security,
        sign_in,
        templating,
    )
    from appliance.ui.web import bp

    app.register_blueprint(bp)
    security.init_app(app)
