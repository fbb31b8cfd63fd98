"""The web pages in a real headless Chromium, served by the daemon's own HTTP server while it makes calls
through the switch (the stand-in, or a real FreeSWITCH with CALLBRIDGE_TEST_ESL).

Screenshots of every page visited land in ``<the test's tmp dir>/screenshots`` (the path is printed and
kept in the test report's properties).
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

import pytest

from daemon.accounts import users
from daemon.accounts.endpoints import authenticate
from daemon.store import Account, Call, Endpoint
from tests.integration.browser import Page, chromium  # noqa: F401 (the fixture)
from tests.integration.conftest import Harness, wait_for

pytestmark = pytest.mark.timeout(300)

PASSWORD = "correct horse battery"


def sign_in(page: Page, harness: Harness, email: str, password: str = PASSWORD) -> None:
    page.base = f"http://127.0.0.1:{harness.service.http_port}"
    page.open("/login")
    page.wait(lambda d: page.finds('input[name="csrf_token"]'), "the sign-in form")
    page.fill({"email": email, "password": password})
    page.find('form[action="/login"] button[type="submit"]').click()
    page.wait(lambda d: page.finds("#sign-out"), f"{email} to be signed in")


def owned_endpoint(harness: Harness, owner: Account, **options: Any) -> Endpoint:
    endpoint = harness.endpoint(**options)
    endpoint.owner = owner.id
    endpoint.save()
    return endpoint


@pytest.mark.time_scale(1.0)
def test_admin_sees_a_call_live_and_hangs_it_up_and_the_pages_fit_a_phone(make_harness: Any,
                                                                          chromium: Page) -> None:
    page = chromium
    harness = make_harness()
    admin = users.create_account("root@example.com", PASSWORD, is_admin=True)
    endpoint = harness.endpoint(name="frontdesk")
    sign_in(page, harness, admin.email)
    call = harness.place(endpoint, "15550000711", "15550000712", prompts=False)  # both stay up 300 s
    page.open("/admin/live")
    row = f'tr[data-callid="{call.callid}"]'
    page.wait(lambda d: page.finds(f'{row} [data-status="bridged"]'), "the call to show as bridged, live")
    page.shot("admin-live-calls")
    page.find(f"{row} button").click()
    page.wait(lambda d: "Hang-up sent to FreeSWITCH" in page.text(".notice"), "the hang-up notice")
    page.wait(lambda d: not page.finds(row), "the call to leave the live list")
    done = harness.wait_final(call)
    assert done.status == "completed" and done.a_cause, harness.timeline(done)

    page.open("/admin/accounts")
    page.shot("admin-accounts")
    page.open("/admin/endpoints")
    page.wait(lambda d: page.finds('tr[data-endpoint="frontdesk"]'), "the endpoints list")
    page.shot("admin-endpoints")

    # Readable on a phone: nothing wider than the screen, every row stacked.
    page.driver.set_window_size(390, 844)
    for path in ("/calls", f"/calls/{call.callid}", "/admin/endpoints", "/endpoints"):
        page.open(path)
        page.wait(lambda d: page.finds("main h1"), path)
        overflow = page.script("return document.documentElement.scrollWidth - window.innerWidth;")
        assert overflow <= 1, f"{path} is {overflow} px wider than a phone's screen"
        page.shot("phone" + re.sub(r"[^a-z]+", "-", path))
