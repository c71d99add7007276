"""Receiving an upload: streamed from the request into storage, typed and hashed on the way.

The multipart parser writes the file part into a `Receiver`, which feeds a temporary file in
the store and the type sniffer chunk by chunk, so a 50 MB upload costs a chunk of memory, not
50 MB. Nothing is named by the client: the type comes from the bytes, the key from our id."""
from __future__ import annotations

from flask import Request
from sqlalchemy.orm import Session
from werkzeug.formparser import FormDataParser

from shared import errors
from shared.db import utcnow
from shared.filetypes import Sniffer
from shared.ids import new_id
from shared.storage import LocalStorage
from shared.web import storable

from .models import Upload

MULTIPART_OVERHEAD = 64 * 1024  # boundaries and part headers around the one file


class Receiver:
    """A writable stream for the multipart parser: into the store, through the sniffer, capped."""

    def __init__(self, storage: LocalStorage, limit: int):
        self.storage, self.limit = storage, limit
        self.temp = storage.temp_file()
        self.sniffer = Sniffer()

    def write(self, chunk: bytes) -> int:
        if self.sniffer.size + len(chunk) > self.limit:
            raise errors.TooLarge(f"The file is larger than {self.limit // (1024 * 1024)} MB.")
        self.sniffer.feed(chunk)
        return self.temp.write(chunk)

    def seek(self, *args) -> int:  # the parser rewinds its stream when the part ends
        return 0

    def tell(self) -> int:
        return self.sniffer.size

    def discard(self) -> None:
        self.storage.discard(self.temp)


def receive(request: Request, session: Session, storage: LocalStorage, agent_id: str, limit: int) -> Upload:
    if request.mimetype != "multipart/form-data":
        raise errors.ValidationError("Send the file as multipart/form-data in the field `file`.",
                                     {"fields": {"file": ["Missing data for required field."]}})
    if request.content_length is not None and request.content_length > limit + MULTIPART_OVERHEAD:
        raise errors.TooLarge(f"The file is larger than {limit // (1024 * 1024)} MB.")
    request.max_content_length = limit + MULTIPART_OVERHEAD  # the app's 1 MB is for JSON bodies
    receivers: list[Receiver] = []

    def stream_factory(total_content_length, content_type, filename, content_length=None):
        receiver = Receiver(storage, limit)
        receivers.append(receiver)
        return receiver

    parser = FormDataParser(stream_factory=stream_factory, max_form_memory_size=64 * 1024,
                            max_content_length=limit + MULTIPART_OVERHEAD, max_form_parts=20)
    try:
        _, _, files = parser.parse(request.stream, request.mimetype, request.content_length,
                                   request.mimetype_params)
        part = files.get("file")
        if part is None:
            raise errors.ValidationError("Send the file in the multipart field `file`.",
                                         {"fields": {"file": ["Missing data for required field."]}})
        receiver = part.stream
        kind = receiver.sniffer.result()
        if kind is None:
            raise errors.ValidationError(
                "This kind of file is not accepted: send an image (JPEG, PNG, WebP, GIF), a video (MP4, "
                "WebM, MOV), a document (PDF, ZIP) or plain text or code.",
                {"fields": {"file": ["Not an accepted file type (judged by its content)."]}})
        upload = Upload(id=new_id("upload"), agent_id=agent_id, media_type=kind.media_type,
                        content_type=kind.content_type, size=receiver.sniffer.size, sha256=receiver.sniffer.sha256,
                        filename=_filename(part.filename), created_at=utcnow())
        upload.storage_key = f"uploads/{upload.id}.{kind.extension}"
        storage.adopt(receiver.temp, upload.storage_key)
        receivers.remove(receiver)
        session.add(upload)
        return upload
    except errors.DomainError:
        raise
    except ValueError as exc:  # a malformed multipart body
        raise errors.ValidationError("The multipart body is malformed.", {"fields": {"file": [str(exc)[:200]]}}) from None
    finally:
        for leftover in receivers:  # parts we did not keep
            leftover.discard()


def _filename(name: str | None) -> str | None:
    """The client's name for the file, kept only as a label (it types nothing)."""
    if not name or not storable(name):
        return None
    return name.replace("\\", "/").rsplit("/", 1)[-1][:255] or None
