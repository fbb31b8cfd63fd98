"""The web pages in a real headless Chromium, served by the daemon's own HTTP server while it makes calls
through the switch (the stand-in, or a real FreeSWITCH with CALLBRIDGE_TEST_ESL).

Screenshots of every page visited land in ``<the test's tmp dir>/screenshots`` (the path is printed and
kept in the test report's properties).
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from daemon.accounts import users
from daemon.accounts.endpoints import authenticate
from daemon.store import Account, Call, Endpoint
from tests.integration.browser import Page, chromium_fixture  # noqa: F401 (the fixture)
from tests.integration.conftest import REAL_ESL, Harness

pytestmark = pytest.mark.timeout(600 if REAL_ESL else 300)
LONG = 400.0 if REAL_ESL else 90.0  # a whole call: real time against a real FreeSWITCH

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


def local_date(zone: str, days: int) -> str:
    when = dt.datetime.now(ZoneInfo(zone)) + dt.timedelta(days=days)
    return when.strftime("%Y-%m-%d %H:%M")


def status_shown(page: Page) -> str:
    """The status the call's page shows now (read in one step: the live region is swapped while it runs)."""
    return str(page.script("var e = document.querySelector('#live .summary [data-status]');"
                           " return e ? e.getAttribute('data-status') : '';"))


@pytest.mark.time_scale(0.5)
def test_an_owner_uses_the_pages_end_to_end_and_another_account_sees_none_of_it(make_harness: Any,
                                                                                  chromium: Page) -> None:
    page = chromium
    harness = make_harness()
    owner = users.create_account("owner@example.com", PASSWORD)
    other = users.create_account("other@example.com", PASSWORD)
    endpoint = owned_endpoint(harness, owner, name="clinic", record=True, timezone="Europe/Paris")
    old_token_hint = endpoint.token_hint

    # Sign in, see the endpoint.
    page.base = f"http://127.0.0.1:{harness.service.http_port}"
    page.open("/login")
    page.wait(lambda d: page.finds('input[name="csrf_token"]'), "the sign-in form")
    page.shot("login")
    page.fill({"email": owner.email, "password": "not the password"})
    page.find('form[action="/login"] button').click()
    page.wait(lambda d: "The email or the password is wrong" in page.text("#form-error"), "the refusal")
    page.fill({"password": PASSWORD})
    page.find('form[action="/login"] button').click()
    page.at("/calls")
    page.open("/endpoints")
    row = 'tr[data-endpoint="clinic"]'
    page.wait(lambda d: page.finds(row), "the endpoint in the list")
    assert old_token_hint in page.text(row) and "On" in page.text(row) and "Europe/Paris" in page.text(row)
    page.shot("endpoints")

    # Rotate its token: shown once.
    page.find(f"{row} form[action$='/rotate'] button").click()
    page.wait(lambda d: page.finds("#new-token"), "the new token")
    token = page.find("#new-token").get_attribute("value")
    page.shot("token-rotated")
    fresh = authenticate(token)
    assert fresh is not None and fresh.id == endpoint.id
    page.open("/endpoints")
    page.wait(lambda d: page.finds(row), "the endpoints list again")
    assert token not in page.driver.page_source and fresh.token_hint in page.text(row)

    # The form says what to fix, in the API's own words.
    page.open("/calls/new")
    page.wait(lambda d: page.finds("#f-phone_a"), "the place-a-call form")
    page.fill({"endpoint": str(endpoint.id), "phone_a": "15550000901", "phone_b": "12",
               "msg": "Hello from the pages.", "msg_lang": "en-GB"})
    page.find('form[action="/calls/new"] button').click()
    page.wait(lambda d: page.finds("#e-phone_b"), "the error beside phone_b")
    assert page.text("#e-phone_b") == "phone_b: 7 to 15 digits with an optional leading +"
    assert page.find("#f-phone_a").get_attribute("value") == "15550000901"  # what was typed stays
    page.shot("place-call-error")

    # Place the call and watch it reach completed without reloading.
    page.fill({"phone_b": "15550002902"})  # answers after 1 s, hangs up 30 s later
    page.find('form[action="/calls/new"] button').click()
    page.wait(lambda d: re.search(r"/calls/[0-9a-z]{8,40}$", d.current_url), "the new call's page")
    callid = page.driver.current_url.rsplit("/", 1)[1]
    first = status_shown(page)
    assert first and first not in ("completed", "failed", "canceled", "missed"), first
    page.script("window.callbridgeSamePage = true;")
    page.shot("call-in-progress")
    page.wait(lambda d: status_shown(page) == "completed", "the call to show completed, live", timeout=LONG)
    assert page.script("return window.callbridgeSamePage === true;"), "the page was reloaded"
    assert int(page.script("return document.documentElement.getAttribute('data-live-updates') || '0';")) >= 1
    call = Call.get(Call.callid == callid)
    assert call.endpoint_id == endpoint.id and call.status == "completed" and call.msg == "Hello from the pages."

    # Its timeline, in the endpoint's time zone.
    steps = page.script("return Array.from(document.querySelectorAll('#timeline li')).map(li => li.dataset.kind);")
    for kind in ("requested", "a_answered", "dialing_b", "bridged", "completed"):
        assert kind in steps, steps
    zone_abbr = dt.datetime.now(ZoneInfo("Europe/Paris")).strftime("%Z")
    assert zone_abbr in page.text("#timeline")
    assert "Hello from the pages." in page.text("ol.played")

    # Its recording plays, and downloads.
    page.wait(lambda d: page.script("var a = document.getElementById('recording');"
                                    " return a !== null && a.readyState >= 1 && a.duration > 0;"),
              "the recording's metadata to load")
    duration = page.script("return document.getElementById('recording').duration;")
    assert duration == pytest.approx(Call.get_by_id(call.id).recording_seconds, abs=0.5)
    page.driver.execute_async_script("var done = arguments[arguments.length - 1];"
                                     " document.getElementById('recording').play().then(function () { done(true); },"
                                     " function (e) { done(String(e)); });")
    page.wait(lambda d: page.script("return document.getElementById('recording').currentTime > 0;"),
              "the recording to play")
    download = page.driver.execute_async_script(
        "var done = arguments[arguments.length - 1];"
        " fetch(document.querySelector('a[download]').href).then(function (r) {"
        "  done([r.status, r.headers.get('content-type'), r.headers.get('content-disposition')]); });")
    assert download == [200, "audio/wav", f"attachment; filename=call-{callid}.wav"]
    page.shot("call-completed")

    # Schedule one for tomorrow, then cancel it from the scheduled list.
    page.open("/calls/new")
    page.wait(lambda d: page.finds("#f-phone_a"), "the place-a-call form")
    page.fill({"endpoint": str(endpoint.id), "phone_a": "15550000903", "phone_b": "15550002903",
               "call_date": local_date("Europe/Paris", 1)})
    page.find('form[action="/calls/new"] button').click()
    page.wait(lambda d: status_shown(page) == "scheduled", "the scheduled call's page")
    scheduled_id = page.driver.current_url.rsplit("/", 1)[1]
    page.open("/scheduled")
    scheduled_row = f'tr[data-callid="{scheduled_id}"]'
    page.wait(lambda d: page.finds(scheduled_row), "the call in the scheduled list")
    page.shot("scheduled")
    page.find(f"{scheduled_row} button").click()
    page.wait(lambda d: "The call is canceled." in page.text(".notice"), "the cancel notice")
    assert not page.finds(scheduled_row)
    canceled = Call.get(Call.callid == scheduled_id)
    assert canceled.status == "canceled" and "web pages" in canceled.reason
    page.open(f"/calls/{scheduled_id}")
    page.wait(lambda d: status_shown(page) == "canceled", "the canceled call's page")
    page.shot("call-canceled")

    page.open(f"/calls?status=completed&endpoint={endpoint.id}")
    page.wait(lambda d: page.finds(f'tr[data-callid="{callid}"]'), "the filtered calls list")
    page.shot("calls")
    page.open("/api")
    page.wait(lambda d: "POST /v1/calls" in page.text("main"), "the API reference")
    page.shot("api-reference")

    # Sign out.
    page.find("#sign-out").click()
    page.at("/login")
    assert "You are signed out." in page.text(".notice")
    page.open(f"/calls/{callid}")
    page.at("/login")

    # Another account sees none of it.
    sign_in(page, harness, other.email)
    page.open("/endpoints")
    page.wait(lambda d: page.finds("main h1"), "the endpoints page")
    assert "clinic" not in page.text("main") and "No endpoint belongs to your account" in page.text("main")
    page.open("/calls")
    page.wait(lambda d: page.finds("#live"), "the calls page")
    assert callid not in page.driver.page_source and "No calls" in page.text("#live")
    for path in (f"/calls/{callid}", f"/calls/{callid}/recording", "/scheduled"):
        page.open(path)
        page.wait(lambda d: page.finds("main h1"), path)
        assert callid not in page.driver.page_source and scheduled_id not in page.driver.page_source, path
    page.open(f"/calls/{callid}")
    page.wait(lambda d: page.finds("main h1"), "the call page")
    assert page.text("main h1") == "Not found"
    page.shot("other-account-not-found")

    # A form posted without its CSRF field is refused, and nothing happens.
    page.open("/endpoints")
    page.wait(lambda d: page.finds("#sign-out"), "a page with the sign-out form")
    page.script("document.querySelector('form[action=\"/logout\"] input[name=\"csrf_token\"]').remove();")
    page.find("#sign-out").click()
    page.wait(lambda d: page.text("main h1") == "Refused", "the refusal page")
    assert "without its security token (csrf_token)" in page.text("main")
    page.shot("csrf-refused")
    page.open("/calls")
    page.wait(lambda d: page.finds("#sign-out"), "still signed in")
