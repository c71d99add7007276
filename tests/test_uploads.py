"""Uploads typed by their bytes, deliveries of uploaded files, and the gate on image originals
(DESIGN.md §3, §5): what each viewer gets in each state, through signed, expiring links."""
from __future__ import annotations

import io
import time
from urllib.parse import parse_qs, urlencode, urlparse

import pytest
from PIL import Image

from tests.support.api import ADMIN, ApiClient


def png(size=(64, 48), colour=(200, 30, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, "PNG")
    return out.getvalue()


def jpeg(size=(64, 48)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (10, 120, 200)).save(out, "JPEG")
    return out.getvalue()


MP4 = b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00mp42isom" + b"\x00" * 64
WEBM = b"\x1a\x45\xdf\xa3\x9f\x42\x86\x81\x01\x42\xf7\x81\x01\x42\x82\x84webm" + b"\x00" * 32
MOV = b"\x00\x00\x00\x14ftypqt  \x00\x00\x00\x00qt  " + b"\x00" * 64
GIF = b"GIF89a\x01\x00\x01\x00\x80\x00\x00\xff\xff\xff\x00\x00\x00!\xf9\x04\x01\x00\x00\x00\x00,\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;"


@pytest.mark.parametrize("content,name,media_type,content_type", [
    (png(), "fox.png", "image", "image/png"),
    (png(), "fox.pdf", "image", "image/png"),                      # named .pdf, is a PNG
    (jpeg(), "upload", "image", "image/jpeg"),
    (GIF, "a.gif", "image", "image/gif"),
    (MP4, "clip.mp4", "video", "video/mp4"),
    (MOV, "clip.mov", "video", "video/quicktime"),
    (WEBM, "clip.webm", "video", "video/webm"),
    (b"%PDF-1.7\n1 0 obj\n<<>>\nendobj\n", "doc.pdf", "document", "application/pdf"),
    (b"PK\x05\x06" + b"\x00" * 18, "empty.zip", "document", "application/zip"),
    (b"#!/bin/sh\nrm -rf /\n", "fox.jpg", "code", "text/x-script; charset=utf-8"),  # a script named .jpg
    (b'{"fox": "red"}', "data.txt", "code", "application/json"),
    (b"import os\n\ndef main():\n    return os.getcwd()\n", "x", "code", "text/x-python; charset=utf-8"),
    (b"# Notes\n\n- a red fox\n", "notes", "text", "text/markdown; charset=utf-8"),
    (b"name,colour\nfox,red\nowl,brown\n", "t", "text", "text/csv; charset=utf-8"),
    ("A plain note, with ünïcode.\n".encode(), "n.bin", "text", "text/plain; charset=utf-8"),
])
def test_an_upload_is_typed_by_its_bytes_not_its_name(api, content, name, media_type, content_type):
    agent = api.agent("Uploader")
    upload = api.upload(agent, content, name)
    assert (upload["media_type"], upload["content_type"], upload["size"]) == (media_type, content_type, len(content))
    assert upload["upload_id"].startswith("upl_") and len(upload["sha256"]) == 64


@pytest.mark.parametrize("content", [
    b"\x7fELF\x02\x01\x01\x00" + b"\x00" * 100,  # an executable
    b"MZ\x90\x00" + b"\x00" * 100,               # a Windows executable
    b"\x00\x01\x02\x03",                         # binary noise
    b"",                                         # nothing
    b"   \n\t ",                                  # only white space
    b"\x00\x00\x00\x18ftypheic" + b"\x00" * 32,  # an image format we do not take
])
def test_anything_else_is_a_400_and_stores_nothing(api, settings, content):
    agent = api.agent("Uploader")
    before = _stored_files(settings)
    body = api.upload(agent, content, "file.jpg", expect=400)
    assert body["code"] == "validation_error" and "file" in body["details"]["fields"]
    assert _stored_files(settings) == before


def _stored_files(settings):
    root = settings.media_path
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file()) if root.exists() else []


def test_an_upload_over_the_limit_is_413_and_leaves_no_file(make_app, tmp_path):
    from tests.support.api import ApiClient
    api = ApiClient(make_app(upload_max_bytes=1000, media_root=str(tmp_path)))
    agent = api.agent("Uploader")
    body = api.upload(agent, b"a" * 1001, "big.txt", expect=413)
    assert body["code"] == "too_large"
    assert api.upload(agent, b"a" * 1000, "ok.txt")["size"] == 1000
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] and not list((tmp_path / ".tmp").iterdir())


@pytest.mark.parametrize("request_kwargs,field", [
    ({"json": {"file": "not a file"}}, "file"),
    ({"data": {"other": (io.BytesIO(b"hello"), "a.txt")}, "content_type": "multipart/form-data"}, "file"),
    ({"data": {"file": "just a form field"}, "content_type": "multipart/form-data"}, "file"),
])
def test_a_malformed_upload_is_a_400(api, request_kwargs, field):
    agent = api.agent("Uploader")
    status, body = api.call("POST", "/api/uploads", agent, **request_kwargs)
    assert status == 400 and body["code"] == "validation_error" and field in body["details"]["fields"], body


def test_only_agents_upload(api):
    buyer = api.buyer()
    status, body = api.call("POST", "/api/uploads", buyer, data={"file": (io.BytesIO(png()), "a.png")},
                            content_type="multipart/form-data")
    assert status == 403 and body["code"] == "forbidden"


# --- delivering uploads --------------------------------------------------------------------------

def _paid(api):
    agent, buyer, order = api.order_in("paid")
    return agent, buyer, order["id"]


def _deliver(api, agent, oid, *deliverables, expect=200):
    status, body = api.post(f"/api/orders/{oid}/deliver", agent, json={"deliverables": list(deliverables)})
    assert status == expect, body
    return body["data"] if status == 200 else body


def test_a_delivery_must_agree_with_what_its_upload_is(api):
    agent, buyer, oid = _paid(api)
    script = api.upload(agent, b"#!/bin/sh\necho hi\n", "fox.jpg")
    body = _deliver(api, agent, oid, {"upload_id": script["upload_id"], "media_type": "image"}, expect=400)
    assert body["details"]["fields"]["deliverables"]["0"]["media_type"]
    picture = api.upload(agent, png(), "fox.pdf")
    body = _deliver(api, agent, oid, {"upload_id": picture["upload_id"], "media_type": "document"}, expect=400)
    assert "image" in body["details"]["fields"]["deliverables"]["0"]["media_type"][0]
    order = _deliver(api, agent, oid, {"upload_id": picture["upload_id"], "media_type": "image"},
                     {"upload_id": script["upload_id"], "media_type": "code"})
    image, code = order["deliveries"][0]["items"]
    assert (image["content_type"], image["preview_status"], code["content_type"]) == (
        "image/png", "pending", "text/x-script; charset=utf-8")


def test_an_upload_goes_into_one_delivery_of_its_own_agent(api):
    agent, buyer, oid = _paid(api)
    other_agent = api.agent("Other")
    theirs = api.upload(other_agent, png(), "x.png")
    body = _deliver(api, agent, oid, {"upload_id": theirs["upload_id"], "media_type": "image"}, expect=400)
    assert body["details"]["fields"]["deliverables"]["0"]["upload_id"] == ["Unknown upload_id."]
    mine = api.upload(agent, png(), "x.png")
    _deliver(api, agent, oid, {"upload_id": mine["upload_id"], "media_type": "image"})
    body = _deliver(api, agent, oid, {"upload_id": mine["upload_id"], "media_type": "image"}, expect=400)
    assert "already" in body["details"]["fields"]["deliverables"]["0"]["upload_id"][0]


# --- the gate ------------------------------------------------------------------------------------

class Gate:
    """An order with an uploaded image and an uploaded PDF, delivered, and its media reported."""

    def __init__(self, api, ready=True):
        self.api = api
        self.agent, self.buyer, self.oid = _paid(api)
        self.image_bytes, self.pdf_bytes = png((80, 60)), b"%PDF-1.7\n%fox\n"
        image = api.upload(self.agent, self.image_bytes, "fox.png")
        pdf = api.upload(self.agent, self.pdf_bytes, "fox.pdf")
        order = _deliver(api, self.agent, self.oid, {"upload_id": image["upload_id"], "media_type": "image"},
                         {"upload_id": pdf["upload_id"], "media_type": "document"})
        self.image_id, self.pdf_id = (i["id"] for i in order["deliveries"][0]["items"])
        if ready:  # what the media worker reports once the preview is rendered
            storage = api.app.extensions["orders_runtime"].storage
            storage.put_bytes("previews/test-preview.jpg", jpeg((32, 24)))
            api.internal("POST", f"/internal/items/{self.image_id}/media",
                         json={"status": "ready", "preview_key": "previews/test-preview.jpg"})

    def items(self, who):
        order = self.api.ok("GET", f"/api/orders/{self.oid}", who)
        return {i["id"]: i for d in order["deliveries"] for i in d["items"]}

    def fetch(self, url, who=None):
        return self.api.call("GET", url, who)[0], self.api.last


def test_before_completion_the_buyer_gets_the_preview_and_never_the_original(api):
    gate = Gate(api)
    items = gate.items(gate.buyer)
    image, pdf = items[gate.image_id], items[gate.pdf_id]
    assert image["url"] is None and image["preview_status"] == "ready" and image["preview_url"]
    status, response = gate.fetch(image["preview_url"])
    assert status == 200 and response.mimetype == "image/jpeg"
    # only images are gated: the document is the buyer's to read now
    status, response = gate.fetch(pdf["url"])
    assert status == 200 and response.data == gate.pdf_bytes


def test_the_agent_and_admins_always_get_the_original(api):
    gate = Gate(api)
    for who in (gate.agent, ADMIN):
        image = gate.items(who)[gate.image_id]
        status, response = gate.fetch(image["url"])
        assert status == 200 and response.data == gate.image_bytes and response.mimetype == "image/png"
        assert response.headers["X-Content-Type-Options"] == "nosniff"


def test_asking_for_the_original_with_the_buyers_credentials_is_refused(api):
    gate = Gate(api)
    agents_link = gate.items(gate.agent)[gate.image_id]["url"]
    status, response = gate.fetch(agents_link, gate.buyer)
    assert status == 403 and response.get_json()["code"] == "forbidden"
    forged = _with(agents_link, role="buyer")  # nor by relabelling a link for the buyer
    assert gate.fetch(forged)[0] == 403


def test_after_approval_the_buyer_gets_the_original(api):
    gate = Gate(api)
    api.ok("PATCH", f"/api/orders/{gate.oid}", gate.buyer, json={"action": "approve"})
    image = gate.items(gate.buyer)[gate.image_id]
    status, response = gate.fetch(image["url"], gate.buyer)
    assert status == 200 and response.data == gate.image_bytes


def test_a_refunded_buyer_never_gets_the_original(api):
    gate = Gate(api)
    api.ok("PATCH", f"/api/orders/{gate.oid}", gate.buyer, json={"action": "dispute", "reason": "Wrong fox."})
    api.ok("POST", f"/api/admin/orders/{gate.oid}/resolve", ADMIN, json={"outcome": "refund", "note": "Refunded."})
    image = gate.items(gate.buyer)[gate.image_id]
    assert image["url"] is None and image["preview_url"]
    admins_link = gate.items(ADMIN)[gate.image_id]["url"]
    assert gate.fetch(admins_link, gate.buyer)[0] == 403


def test_a_stranger_sees_no_order_and_no_link(api):
    gate = Gate(api)
    stranger = api.buyer()
    status, body = api.get(f"/api/orders/{gate.oid}", stranger)
    assert status == 404 and body["code"] == "not_found"


def test_file_links_have_a_rate_limit_budget_of_their_own(make_app, frozen_window):
    """A page of previews is fetched without credentials: its links must not spend the budget its
    viewer's address has for the API."""
    api = ApiClient(make_app(rate_limits=True, rate_limit_anonymous_per_minute=20, rate_limit_files_per_minute=25))
    gate = Gate(api)
    preview = gate.items(gate.buyer)[gate.image_id]["preview_url"]
    statuses = [gate.fetch(preview)[0] for _ in range(26)]
    assert statuses == [200] * 25 + [429]
    assert api.last.get_json()["code"] == "rate_limited" and int(api.last.headers["Retry-After"]) > 0
    status, _ = api.get(f"/api/agents/{gate.agent.id}")  # anonymous too, from the same address
    assert status == 200 and api.last.headers["X-RateLimit-Limit"] == "20"
    assert int(api.last.headers["X-RateLimit-Remaining"]) > 0


def test_tampered_and_expired_links_are_refused(api, make_app):
    gate = Gate(api)
    link = gate.items(gate.agent)[gate.image_id]["url"]
    query = parse_qs(urlparse(link).query)
    for changed in (_with(link, sig="0" * 64), _with(link, expires=str(int(query["expires"][0]) + 3600)),
                    link.replace("/original", "/preview").replace(gate.image_id, gate.pdf_id),
                    _with(link, role="root"), link.split("?")[0],
                    _with(link, sig="\u00b9\u00b2\u00b3"), _with(link, sig="\u4e2d" * 64),
                    _with(link, expires="\u00b9\u00b2\u00b3")):  # not ASCII (the last passes str.isdigit())
        status, response = gate.fetch(changed)
        assert status == 403 and response.get_json()["code"] == "forbidden", changed
    short = make_app(file_link_ttl_seconds=1)
    from tests.support.api import ApiClient
    short_api = ApiClient(short)
    expiring = short.extensions["orders_runtime"].links.url(gate.image_id, "original", "agent")
    assert short_api.call("GET", expiring)[0] == 200
    time.sleep(2.1)
    status, body = short_api.call("GET", expiring)
    assert status == 403 and body["details"]["reason"] == "expired"


def _with(link: str, **changes) -> str:
    parts = urlparse(link)
    query = {k: v[0] for k, v in parse_qs(parts.query).items()}
    query.update(changes)
    return f"{parts.path}?{urlencode(query)}"


def test_a_failed_preview_tells_the_agent_why_and_the_buyer_only_that_it_failed(api):
    gate = Gate(api, ready=False)
    api.internal("POST", f"/internal/items/{gate.image_id}/media",
                 json={"status": "failed", "error": "The image is larger than 40 megapixels."})
    assert gate.items(gate.agent)[gate.image_id]["preview_error"] == "The image is larger than 40 megapixels."
    buyers = gate.items(gate.buyer)[gate.image_id]
    assert (buyers["preview_status"], buyers["preview_error"], buyers["preview_url"]) == ("failed", None, None)


def test_media_reports_repeat_harmlessly_and_ready_never_goes_back(api):
    gate = Gate(api, ready=False)
    report = {"status": "ready", "preview_key": "previews/p.jpg"}
    assert api.internal("POST", f"/internal/items/{gate.image_id}/media", json=report)["applied"] is True
    assert api.internal("POST", f"/internal/items/{gate.image_id}/media", json=report)["applied"] is False
    late_failure = {"status": "failed", "error": "timeout"}
    assert api.internal("POST", f"/internal/items/{gate.image_id}/media", json=late_failure)["applied"] is False
    assert gate.items(gate.agent)[gate.image_id]["preview_status"] == "ready"


@pytest.mark.parametrize("original, field", [
    ({"original_key": "originals/x.jpg"}, "content_type"),  # the original is served with its type
    ({"original_key": "originals/x.jpg", "content_type": "image/jpeg", "size": 2**63 + 1}, "size"),
], ids=["original-without-its-type", "size-beyond-the-column"])
def test_a_media_report_that_cannot_be_stored_is_a_400_and_changes_nothing(api, original, field):
    gate = Gate(api, ready=False)
    status, body = api.call("POST", f"/internal/items/{gate.image_id}/media",
                            json={"status": "ready", "preview_key": "previews/p.jpg", **original},
                            headers={"X-Service-Token": api.app.config["SETTINGS"].service_token})
    assert (status, body["code"]) == (400, "validation_error") and field in body["details"]["fields"]
    assert gate.items(gate.agent)[gate.image_id]["preview_status"] == "pending"


def test_the_delivered_event_tells_the_media_worker_where_each_image_is(api, db):
    from sqlalchemy import select
    from services.orders.models import OutboxEvent
    gate = Gate(api, ready=False)
    with db.transaction() as session:
        event = session.scalars(select(OutboxEvent).where(OutboxEvent.order_id == gate.oid,
                                                          OutboxEvent.event == "order.delivered")).one()
    image, pdf = event.data["items"]
    assert image["id"] == gate.image_id and image["media_type"] == "image"
    assert image["storage_key"].startswith("uploads/") and len(image["sha256"]) == 64 and image["url"] is None
    assert pdf["media_type"] == "document"


def test_a_preview_still_pending_after_a_while_is_asked_for_again(api, db):
    import datetime as dt
    from sqlalchemy import select, update
    from services.orders import services
    from services.orders.models import Delivery, OutboxEvent
    gate = Gate(api, ready=False)
    done = Gate(api)  # its preview is ready: nothing to ask
    rt = api.app.extensions["orders_runtime"]
    now = dt.datetime.now(dt.timezone.utc)
    with db.transaction() as session:
        assert services.request_stuck_previews(session, rt, now - dt.timedelta(minutes=15)) == 0  # too recent
        session.execute(update(Delivery).values(created_at=now - dt.timedelta(hours=1)))
    with db.transaction() as session:
        assert services.request_stuck_previews(session, rt, now - dt.timedelta(minutes=15)) == 1
    with db.transaction() as session:
        [event] = session.scalars(select(OutboxEvent).where(OutboxEvent.event == "media.retry_requested")).all()
    assert event.order_id == gate.oid and [i["id"] for i in event.data["items"]] == [gate.image_id]
    assert done.oid != gate.oid
