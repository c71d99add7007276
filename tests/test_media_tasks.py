"""The media worker's task (DESIGN.md §3, §5): each image item of a delivery gets a preview (a URL
image is fetched and stored first) and its outcome is reported to the orders service; a bad item
does not stop the others; running twice stores and renders nothing new and reports the same."""
from __future__ import annotations

import hashlib
import io

import pytest
from celery.exceptions import SoftTimeLimitExceeded
from PIL import Image

from services.media import tasks
from services.media.render import preview_key
from services.media.tasks import Media
from shared.internal import InternalError, Unavailable
from shared.settings import load
from shared.storage import LocalStorage
from tests.test_media_fetch import Server, body
from tests.test_media_render import png_bomb

ORDER = "ord_Tq8wZb3nXc5vLk2m"


def jpeg(size=(2000, 1500), colour=(30, 90, 160)) -> bytes:
    im = Image.new("RGB", size, colour)
    im.paste((230, 200, 40), (size[0] // 4, size[1] // 4, size[0] // 2, size[1] // 2))
    out = io.BytesIO()
    im.save(out, "JPEG", quality=90)
    return out.getvalue()


PHOTO = jpeg()
HTML = b"<!doctype html><html><body><img src='/photo.jpg'></body></html>"


class FakeOrders:
    """Records each report; answers with the errors a test sets per item."""

    def __init__(self, errors: dict | None = None):
        self.posts, self.errors = [], errors or {}

    def post(self, path: str, body: dict):
        self.posts.append((path, body))
        item_id = path.split("/")[3]
        failures = self.errors.get(item_id)
        if failures:
            raise failures.pop(0) if isinstance(failures, list) else failures
        return {"applied": True}

    def reports(self) -> dict:
        return {path.split("/")[3]: body for path, body in self.posts}


@pytest.fixture(autouse=True)
def pillow_guard(monkeypatch):
    """Rendering sets Pillow's process-wide pixel guard from the settings; put it back."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", Image.MAX_IMAGE_PIXELS)


@pytest.fixture(scope="module")
def server():
    server = Server({"/photo.jpg": body(PHOTO, "image/jpeg"), "/page": body(HTML, "text/html"),
                     "/empty": body(b"", "image/png")})
    yield server
    server.close()


@pytest.fixture
def storage(tmp_path) -> LocalStorage:
    return LocalStorage(tmp_path / "media")


@pytest.fixture
def settings(server, storage):
    return load({}, media_root=str(storage.root), media_fetch_allowed_hosts=(f"127.0.0.1:{server.port}",),
                media_fetch_timeout_seconds=5.0)


@pytest.fixture
def orders() -> FakeOrders:
    return FakeOrders()


@pytest.fixture
def media(settings, storage, orders) -> Media:
    return Media(settings, storage, orders)


def uploaded(storage: LocalStorage, data: bytes, name: str = "upl_1") -> dict:
    key = f"uploads/{name}"
    storage.put_bytes(key, data)
    return {"storage_key": key, "sha256": hashlib.sha256(data).hexdigest(), "url": None}


def linked(url: str) -> dict:
    return {"url": url, "storage_key": None, "sha256": None}


def delivered(*items: dict, order_id: str = ORDER) -> dict:
    numbered = [{"id": f"itm_{n}", "media_type": "image", **item} for n, item in enumerate(items, 1)]
    return {"id": "evt_1", "event": "order.delivered", "order_id": order_id,
            "data": {"delivery_id": "dlv_1", "items": numbered}}


def files(storage: LocalStorage, folder: str) -> list[str]:
    path = storage.root / folder
    return sorted(p.name for p in path.iterdir()) if path.exists() else []


def test_an_uploaded_image_gets_its_preview(media, storage, orders):
    item = uploaded(storage, PHOTO)
    assert media.process_delivery(delivered(item)) == []
    key = preview_key(item["sha256"], ORDER)
    assert orders.posts == [("/internal/items/itm_1/media",
                             {"status": "ready", "sha256": item["sha256"], "preview_key": key})]
    with storage.open(key) as f:
        assert Image.open(f).size == (1024, 768)


def test_an_image_url_is_fetched_stored_by_content_and_previewed(media, storage, orders, server):
    media.process_delivery(delivered(linked(f"{server.url}/photo.jpg")))
    sha = hashlib.sha256(PHOTO).hexdigest()
    assert orders.reports()["itm_1"] == {
        "status": "ready", "preview_key": preview_key(sha, ORDER), "original_key": f"originals/{sha}.jpg",
        "sha256": sha, "content_type": "image/jpeg", "size": len(PHOTO)}
    with storage.open(f"originals/{sha}.jpg") as f:
        assert f.read() == PHOTO
    assert storage.exists(preview_key(sha, ORDER))
    assert files(storage, ".tmp") == []


@pytest.mark.parametrize("path,served", [("/page", "text/plain; charset=utf-8"), ("/empty", "an empty body")])
def test_a_url_that_is_not_an_image_fails_with_the_reason(path, served, media, storage, orders, server):
    media.process_delivery(delivered(linked(f"{server.url}{path}")))
    report = orders.reports()["itm_1"]
    assert report["status"] == "failed"
    assert "does not serve an image" in report["error"] and served in report["error"]
    assert files(storage, "originals") == [] and files(storage, ".tmp") == []


def test_a_refused_url_fails_with_the_reason(media, orders):
    media.process_delivery(delivered(linked("http://10.0.0.1/photo.jpg")))
    report = orders.reports()["itm_1"]
    assert report["status"] == "failed" and "10.0.0.1 is a private address" in report["error"]


def test_a_bomb_fails_with_the_reason(media, storage, orders):
    media.process_delivery(delivered(uploaded(storage, png_bomb(30000, 30000))))
    report = orders.reports()["itm_1"]
    assert report["status"] == "failed" and "pixels" in report["error"]
    assert files(storage, "previews") == []


def test_items_that_are_not_images_are_left_alone(media, orders):
    message = delivered(linked("https://example.com/report.pdf"))
    message["data"]["items"][0]["media_type"] = "document"
    assert media.process_delivery(message) == []
    assert orders.posts == []


def test_one_bad_item_does_not_stop_the_others(media, storage, orders, server):
    media.process_delivery(delivered(linked("http://169.254.169.254/latest/meta-data/"),
                                     uploaded(storage, b"GIF89a junk"), linked(f"{server.url}/photo.jpg"),
                                     uploaded(storage, PHOTO, "upl_2")))
    assert [r["status"] for r in orders.reports().values()] == ["failed", "failed", "ready", "ready"]


def test_an_unexpected_error_fails_the_item_visibly(media, storage, orders):
    item = uploaded(storage, PHOTO)
    storage.delete(item["storage_key"])
    media.process_delivery(delivered(item))
    assert orders.reports()["itm_1"] == {"status": "failed", "error": tasks.INTERNAL_FAILURE}


def test_running_twice_stores_and_renders_nothing_new_and_reports_the_same(media, storage, orders, server,
                                                                           monkeypatch):
    message = delivered(uploaded(storage, PHOTO), linked(f"{server.url}/photo.jpg"),
                        linked(f"{server.url}/page"))
    media.process_delivery(message)
    first = list(orders.posts)
    keys = [f"{folder}/{name}" for folder in ("previews", "originals") for name in files(storage, folder)]
    stored = {key: (storage.root / key).stat().st_mtime_ns for key in keys}
    assert len(stored) == 2  # one preview for both copies of the photo, one original
    renders = []
    monkeypatch.setattr(tasks, "render_preview", lambda *args: renders.append(args))
    media.process_delivery(message)
    assert orders.posts[len(first):] == first
    assert renders == []
    assert {key: (storage.root / key).stat().st_mtime_ns for key in stored} == stored
    assert len(files(storage, "previews")) + len(files(storage, "originals")) == 2
    assert files(storage, ".tmp") == []


def test_each_order_gets_its_own_stamped_preview_of_the_same_file(media, storage, orders, server):
    media.process_delivery(delivered(linked(f"{server.url}/photo.jpg"), order_id="ord_one"))
    media.process_delivery(delivered(linked(f"{server.url}/photo.jpg"), order_id="ord_two"))
    first, second = (body["preview_key"] for _, body in orders.posts)
    assert first != second and len(files(storage, "originals")) == 1
    with storage.open(first) as a, storage.open(second) as b:
        assert a.read() != b.read()


def test_a_report_the_orders_service_could_not_take_is_returned_for_later(media, storage, orders):
    orders.errors = {"itm_1": Unavailable("down", ambiguous=True), "itm_2": InternalError(404, "not_found", "gone")}
    left = media.process_delivery(delivered(uploaded(storage, PHOTO), uploaded(storage, PHOTO, "upl_2"),
                                            uploaded(storage, PHOTO, "upl_3")))
    assert [item["id"] for item in left] == ["itm_1"]
    assert len(orders.posts) == 3


def test_out_of_time_the_item_and_the_rest_fail_with_the_reason(media, storage, orders, monkeypatch):
    def too_slow(*args):
        raise SoftTimeLimitExceeded()
    monkeypatch.setattr(tasks, "render_preview", too_slow)
    media.process_delivery(delivered(uploaded(storage, PHOTO), uploaded(storage, PHOTO, "upl_2")))
    first, rest = orders.reports().values()
    assert first["status"] == rest["status"] == "failed"
    assert "time limit (120 s)" in first["error"] and "Not processed" in rest["error"]


# --- the Celery task around it ---------------------------------------------------------------------

@pytest.fixture
def task_media(media, monkeypatch):
    monkeypatch.setattr(tasks, "media", lambda: media)
    return media


def test_the_task_retries_only_the_unreported_items(task_media, storage, orders):
    orders.errors = {"itm_2": [Unavailable("down", ambiguous=False)]}
    tasks.process_delivery.apply(args=[delivered(uploaded(storage, PHOTO), uploaded(storage, PHOTO, "upl_2"))])
    assert [path.split("/")[3] for path, _ in orders.posts] == ["itm_1", "itm_2", "itm_2"]


def test_the_task_gives_up_after_its_retries(task_media, storage, orders):
    orders.errors = {"itm_1": Unavailable("down", ambiguous=False)}
    result = tasks.process_delivery.apply(args=[delivered(uploaded(storage, PHOTO))])
    assert result.successful()
    assert len(orders.posts) == tasks.REPORT_RETRIES + 1
