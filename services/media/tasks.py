"""The media worker's Celery task (queue `media`): a delivery's images get their watermarked
previews, an image URL is fetched and stored first, and each item's outcome is reported to the
orders service. Safe to run twice: originals and previews are keyed by content (and previews by
order and render version), so a second run stores and renders nothing and reports the same."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import lru_cache
from typing import BinaryIO, Protocol

from celery.exceptions import MaxRetriesExceededError, SoftTimeLimitExceeded

from shared import logs
from shared.celery_app import make_celery, max_countdown
from shared.filetypes import Sniffer
from shared.internal import InternalClient, InternalError, Unavailable
from shared.settings import Settings, load
from shared.storage import LocalStorage, make_storage

from .fetch import FetchRefused, fetch_image
from .render import PreviewRefused, preview_key, render_preview

log = logging.getLogger(__name__)
settings = load()
app = make_celery("media", settings)
app.conf.update(
    task_default_queue="media",
    worker_prefetch_multiplier=1,  # one image in memory per process at a time
    task_time_limit=settings.media_task_time_limit_seconds,
    task_soft_time_limit=int(settings.media_task_time_limit_seconds * 0.8),
)
REPORT_RETRIES = 10
REPORT_RETRY_BASE_SECONDS = 5
REPORT_RETRY_MAX_SECONDS = 300  # and never more than celery_app.max_countdown
ERROR_MAX_CHARS = 2000  # what the orders service accepts
INTERNAL_FAILURE = "The image could not be processed because of an error on our side; please deliver it again."


class Orders(Protocol):
    def post(self, path: str, body: dict): ...


class _Tee:
    """Writes to the file and feeds the sniffer in one pass, so the fetched bytes are read once."""

    def __init__(self, file: BinaryIO, sniffer: Sniffer):
        self.file, self.sniffer = file, sniffer

    def write(self, chunk: bytes) -> int:
        self.sniffer.feed(chunk)
        return self.file.write(chunk)


@dataclass
class Media:
    settings: Settings
    storage: LocalStorage
    orders: Orders

    def process_delivery(self, message: dict) -> list[dict]:
        """Preview and report every image item of an `order.delivered` event; one item's failure
        does not stop the others. Returns the items whose report must be sent again later."""
        order_id = message["order_id"]
        images = [i for i in message["data"]["items"] if i["media_type"] == "image"]
        limit = self.settings.media_task_time_limit_seconds
        unreported, out_of_time = [], False
        for item in images:
            if out_of_time:
                report = _failed(f"Not processed: this delivery's images ran past their time limit ({limit} s "
                                 "together). Deliver fewer or smaller images.")
            else:
                try:
                    report = self.process_item(order_id, item)
                except SoftTimeLimitExceeded:  # the rest are reported failed before the hard limit hits
                    out_of_time = True
                    report = _failed(f"Processing this image ran past the delivery's time limit ({limit} s).")
            if not self.report(item["id"], report):
                unreported.append(item)
        return unreported

    def process_item(self, order_id: str, item: dict) -> dict:
        """The report on one image item: ready with its preview, or failed with the reason."""
        try:
            if item.get("storage_key"):
                return {"status": "ready", "sha256": item["sha256"],
                        "preview_key": self._preview(item["storage_key"], item["sha256"], order_id)}
            if item.get("url"):
                return self._fetched(order_id, item["url"])
            return _failed("The item has neither a file nor a URL.")
        except (FetchRefused, PreviewRefused) as exc:
            log.info("media: item %s of order %s refused: %s", item.get("id"), order_id, exc)
            return _failed(str(exc))
        except SoftTimeLimitExceeded:
            raise
        except Exception:  # a bug or a storage fault: the item shows failed rather than pending forever
            log.exception("media: item %s of order %s failed", item.get("id"), order_id)
            return _failed(INTERNAL_FAILURE)

    def _fetched(self, order_id: str, url: str) -> dict:
        temp, sniffer = self.storage.temp_file(), Sniffer()
        try:
            fetch_image(url, _Tee(temp, sniffer), self.settings)
            kind = sniffer.result()
            if kind is None or kind.media_type != "image":
                served = f"{kind.content_type}, {sniffer.size:,} bytes" if kind else (
                    f"unrecognised content, {sniffer.size:,} bytes" if sniffer.size else "an empty body")
                raise FetchRefused(f"The URL does not serve an image (it served {served}). Deliver a direct "
                                   "link to a JPEG, PNG, GIF or WebP file.")
        except BaseException:
            self.storage.discard(temp)
            raise
        original = f"originals/{sniffer.sha256}.{kind.extension}"
        if self.storage.exists(original):
            self.storage.discard(temp)
        else:
            self.storage.adopt(temp, original)
        return {"status": "ready", "preview_key": self._preview(original, sniffer.sha256, order_id),
                "original_key": original, "sha256": sniffer.sha256, "content_type": kind.content_type,
                "size": sniffer.size}

    def _preview(self, original: str, sha256: str, order_id: str) -> str:
        key = preview_key(sha256, order_id)
        if not self.storage.exists(key):
            with self.storage.open(original) as source:
                self.storage.put_bytes(key, render_preview(source, order_id, self.settings))
        return key

    def report(self, item_id: str, body: dict) -> bool:
        """Tell the orders service; False if it could not be told now (worth trying again)."""
        try:
            self.orders.post(f"/internal/items/{item_id}/media", body)
        except Unavailable as exc:
            log.warning("media: report on item %s not delivered (%s); retrying later", item_id, exc)
            return False
        except InternalError as exc:
            level = logging.INFO if exc.status in (404, 409) else logging.ERROR
            log.log(level, "media: report on item %s refused (%s); dropped", item_id, exc)
        return True


def _failed(reason: str) -> dict:
    return {"status": "failed", "error": reason[:ERROR_MAX_CHARS]}


@lru_cache(maxsize=1)
def media() -> Media:
    return Media(settings, make_storage(settings), InternalClient(settings.orders_url, settings.service_token))


@app.task(name="media.process_delivery", bind=True, acks_late=True, max_retries=REPORT_RETRIES)
def process_delivery(self, message: dict) -> None:
    """Previews for an `order.delivered` event. Reports the orders service could not take are
    sent again later (with only their items), with backoff and a cap."""
    logs.order_id.set(message.get("order_id"))
    unreported = media().process_delivery(message)
    if unreported:
        again = {**message, "data": {**message["data"], "items": unreported}}
        countdown = min(REPORT_RETRY_BASE_SECONDS * 2 ** self.request.retries, REPORT_RETRY_MAX_SECONDS,
                        max_countdown(settings))
        try:
            raise self.retry(args=[again], countdown=countdown)
        except MaxRetriesExceededError:
            log.error("media: %d report(s) for order %s never reached the orders service; the items stay "
                      "pending", len(unreported), message.get("order_id"))
