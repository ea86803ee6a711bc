"""A browser-like Flask test client for the web UI: cookies kept, CSRF tokens read from pages."""

from __future__ import annotations

import html
import re

import pytest

from appliance.auth import identities
from appliance.domain.context import SYSTEM, Context

PASSWORD = "correct horse battery"
_CSRF = re.compile(r'name="csrf_token" value="([^"]+)"')


class Browser:
    """Signs in through the sign-in form and submits forms with the page's CSRF token."""

    def __init__(self, app):
        self.client = app.test_client()
        self.token = ""

    def get(self, path: str, **kwargs):
        response = self.client.get(path, **kwargs)
        found = (
            _CSRF.search(response.get_data(as_text=True))
            if response.mimetype == "text/html"
            else None
        )
        if found:
            self.token = html.unescape(found.group(1))
        return response

    def post(self, path: str, data: dict | None = None, *, csrf: bool = True, **kwargs):
        form = dict(data or {})
        if csrf:
            form.setdefault("csrf_token", self.token)
        return self.client.post(path, data=form, **kwargs)

    def sign_in(self, username: str, password: str = PASSWORD):
        self.get("/ui/sign-in")
        response = self.post("/ui/sign-in", {"username": username, "password": password})
        assert response.status_code == 302, response.get_data(as_text=True)
        self.get("/ui/projects")
        return response


def make_person(username: str, system_role: str | None = None):
    return identities.create_user(Context(SYSTEM, "test-setup"), username, PASSWORD, system_role)


@pytest.fixture
def browser(app, bound_db):
    return Browser(app)


@pytest.fixture
def signed_in(app, bound_db):
    """A browser signed in as alice, who is a plain user (no system role)."""
    make_person("alice")
    browser = Browser(app)
    browser.sign_in("alice")
    return browser


def text(response) -> str:
    return response.get_data(as_text=True)
