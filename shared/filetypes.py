"""What a file is, from its bytes alone: never from its name or a declared Content-Type.

`Sniffer` is fed a file chunk by chunk (so a 50 MB upload is never held whole) and says at the
end what the file is, or None for anything not allowed: images (JPEG, PNG, WebP, GIF), video
(MP4, MOV, WebM), documents (PDF, ZIP), and plain UTF-8 text, which is `code` when it parses as
JSON or Python or starts with a shebang, and `text` otherwise (Markdown and CSV included).
"""
from __future__ import annotations

import ast
import codecs
import csv
import hashlib
import json
import re
from dataclasses import dataclass

HEAD_BYTES = 64 * 1024
PARSE_LIMIT = 2 * 1024 * 1024  # text larger than this is not parsed for JSON/Python


@dataclass(frozen=True)
class FileType:
    media_type: str  # image | video | document | text | code
    content_type: str
    extension: str


# which declared delivery media types the bytes can stand for
COMPATIBLE = {"image": {"image"}, "video": {"video"}, "document": {"document"}, "text": {"text", "code"},
              "code": {"code", "text"}}


def _binary(head: bytes) -> FileType | None:
    if head.startswith(b"\xff\xd8\xff"):
        return FileType("image", "image/jpeg", "jpg")
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return FileType("image", "image/png", "png")
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return FileType("image", "image/gif", "gif")
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return FileType("image", "image/webp", "webp")
    if head[4:8] == b"ftyp":
        brand = head[8:12]
        if brand == b"qt  ":
            return FileType("video", "video/quicktime", "mov")
        if brand[:3] in (b"iso", b"mp4", b"avc", b"M4V", b"MSN", b"das", b"mmp") or brand[:2] == b"3g":
            return FileType("video", "video/mp4", "mp4")
        return None  # HEIC, AVIF and other ISO media we do not take
    if head.startswith(b"\x1a\x45\xdf\xa3") and b"webm" in head[:64]:
        return FileType("video", "video/webm", "webm")
    if head.startswith(b"%PDF-"):
        return FileType("document", "application/pdf", "pdf")
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return FileType("document", "application/zip", "zip")
    return None


def _text_type(text: str | None, head: str) -> FileType:
    first = head.lstrip("\ufeff")
    if first.startswith("#!"):
        return FileType("code", "text/x-script; charset=utf-8", "txt")
    if text is not None:
        stripped = text.strip()
        if stripped[:1] in ("{", "[") and _is_json(stripped):
            return FileType("code", "application/json", "json")
        if re.search(r"^(def |class |import |from \w+ import |async def )", text, re.M) and _is_python(text):
            return FileType("code", "text/x-python; charset=utf-8", "py")
    if re.search(r"^(#{1,6} |[-*] |```|\d+\. )", first, re.M):
        return FileType("text", "text/markdown; charset=utf-8", "md")
    if _is_csv(first):
        return FileType("text", "text/csv; charset=utf-8", "csv")
    return FileType("text", "text/plain; charset=utf-8", "txt")


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except (ValueError, RecursionError):
        return False


def _is_python(text: str) -> bool:
    try:
        ast.parse(text)
        return True
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return False


def _is_csv(head: str) -> bool:
    lines = [line for line in head.splitlines()[:20] if line.strip()]
    if len(lines) < 2:
        return False
    try:
        dialect = csv.Sniffer().sniff("\n".join(lines), delimiters=",;\t")
    except csv.Error:
        return False
    counts = {len(row) for row in csv.reader(lines, dialect)}
    return len(counts) == 1 and counts.pop() > 1


class Sniffer:
    """Feed chunks; then `result()` gives the type (or None: not allowed), `size` and `sha256`."""

    def __init__(self):
        self.size = 0
        self._hash = hashlib.sha256()
        self._head = bytearray()
        self._decoder = codecs.getincrementaldecoder("utf-8")()
        self._is_text = True
        self._text: list[str] | None = []

    def feed(self, chunk: bytes) -> None:
        self.size += len(chunk)
        self._hash.update(chunk)
        if len(self._head) < HEAD_BYTES:
            self._head += chunk[:HEAD_BYTES - len(self._head)]
        if self._is_text:
            if b"\x00" in chunk:
                self._is_text = False
                return
            try:
                decoded = self._decoder.decode(chunk)
            except UnicodeDecodeError:
                self._is_text = False
                return
            if self._text is not None:
                if self.size > PARSE_LIMIT:
                    self._text = None
                else:
                    self._text.append(decoded)

    @property
    def sha256(self) -> str:
        return self._hash.hexdigest()

    def result(self) -> FileType | None:
        if self.size == 0:
            return None
        found = _binary(bytes(self._head))
        if found is not None:
            return found
        if not self._is_text:
            return None
        try:
            tail = self._decoder.decode(b"", final=True)
        except UnicodeDecodeError:
            return None
        text = None if self._text is None else "".join(self._text) + tail
        head = bytes(self._head).decode("utf-8", errors="ignore")
        if not head.strip():
            return None  # only white space: nothing to deliver
        if any(ord(c) < 32 and c not in "\t\n\r\f" for c in head):
            return None  # control characters: binary that happens to be valid UTF-8
        return _text_type(text, head)


def sniff_bytes(data: bytes) -> FileType | None:
    sniffer = Sniffer()
    sniffer.feed(data)
    return sniffer.result()
