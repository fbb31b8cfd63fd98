"""The web pages (sign in, endpoints and tokens, calls, scheduled calls, admin), served by the API's app.

Server-rendered Jinja templates with one small script for live updates; the templates, the stylesheet
and the script ship inside this package, so the pages work on a machine with no internet access.
"""

from __future__ import annotations

from flask import Flask

from daemon.config import Settings
from webapi.portal import admin, pages  # noqa: F401 (their routes join the blueprint)
from webapi.portal.base import bp
from webapi.portal.security import PortalSecurity


def register(app: Flask, settings: Settings) -> None:
    """Add the pages to ``app`` (the secret key file is read, or made, here)."""
    app.extensions["callbridge_portal"] = PortalSecurity(settings)
    app.register_blueprint(bp)
