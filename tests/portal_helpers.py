"""Helpers for the web pages' tests: a signed-in test client that reads CSRF tokens off the pages."""

from __future__ import annotations

import html
import re
from typing import Any

from flask.testing import FlaskClient

from daemon.accounts import users
from daemon.store import Account

PASSWORD = "correct horse battery"
CSRF_RE = re.compile(r'name="csrf_token" value="([^"]*)"')
ERROR_RE = re.compile(r'class="(?:error|field-error)"[^>]*>([^<]*)<')


def make_account(email: str, *, admin: bool = False, password: str = PASSWORD) -> Account:
    return users.create_account(email, password, is_admin=admin)


def csrf_of(page: str) -> str:
    found = CSRF_RE.search(page)
    assert found, "the page holds no form with a CSRF token"
    return html.unescape(found.group(1))


def errors_of(page: str) -> list[str]:
    return [html.unescape(e) for e in ERROR_RE.findall(page)]


class Browser:
    """A test client used like a person uses the pages: GET a page, fill its form, POST it."""

    def __init__(self, client: FlaskClient) -> None:
        self.client = client

    def get(self, path: str, **kwargs: Any) -> Any:
        return self.client.get(path, **kwargs)

    def text(self, path: str, status: int = 200) -> str:
        response = self.client.get(path)
        assert response.status_code == status, (path, response.status_code, response.get_data(as_text=True)[:500])
        return str(response.get_data(as_text=True))

    def submit(self, page_path: str, action: str, data: dict[str, str] | None = None, **kwargs: Any) -> Any:
        """POST ``data`` to ``action`` with the CSRF token of the form on ``page_path``."""
        token = csrf_of(self.text(page_path))
        return self.client.post(action, data={**(data or {}), "csrf_token": token}, **kwargs)

    def login(self, email: str, password: str = PASSWORD) -> Any:
        response = self.submit("/login", "/login", {"email": email, "password": password})
        return response

    def signed_in_as(self, email: str, password: str = PASSWORD) -> Browser:
        response = self.login(email, password)
        assert response.status_code == 303, errors_of(response.get_data(as_text=True))
        return self
