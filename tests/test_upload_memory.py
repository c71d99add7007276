"""A 50 MB upload streams through the real web process without raising its memory by more than a
few MB (DESIGN.md §4: uploads are streamed to storage, never held whole)."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from tests.support.api import ApiClient
from tests.support.net import free_port

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[1]
SIZE = 50 * 1024 * 1024
BOUNDARY = "orderdesk-memory-test"


class StreamedUpload:
    """A multipart body made on the fly: a PDF header, then `size` bytes in all, never in memory."""

    def __init__(self, size: int):
        head = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"big.pdf\"\r\n"
                f"Content-Type: application/pdf\r\n\r\n").encode()
        self.parts = [head, None, f"\r\n--{BOUNDARY}--\r\n".encode()]
        self.size, self.sent, self.stage = size, 0, 0
        self.len = len(head) + size + len(self.parts[2])
        self.sha256 = hashlib.sha256()
        self.block = b"%PDF-1.7\n" + bytes(range(256)) * 256

    def read(self, n: int = 65536) -> bytes:
        while self.stage < 3:
            if self.stage == 1:
                if self.sent < self.size:
                    chunk = (self.block * (n // len(self.block) + 1))[:min(n, self.size - self.sent)]
                    self.sent += len(chunk)
                    self.sha256.update(chunk)
                    return chunk
            elif self.parts[self.stage]:
                chunk, self.parts[self.stage] = self.parts[self.stage], b""
                self.stage += 1
                return chunk
            self.stage += 1
        return b""


def peak_rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


def workers_of(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(c) for c in children]


@pytest.fixture
def web(make_app, migrated, redis_url, tmp_path):
    app = make_app(media_root=str(tmp_path / "media"))
    port = free_port()
    env = dict(os.environ, DATABASE_URL=migrated.url.replace("postgresql+psycopg://", "postgresql://"),
               REDIS_URL=redis_url, RATE_LIMITS="off", LOG_LEVEL="WARNING", MEDIA_ROOT=str(tmp_path / "media"))
    proc = subprocess.Popen([sys.executable, "-m", "gunicorn", "--worker-class", "gthread", "--workers", "1",
                             "--threads", "2", "--bind", f"127.0.0.1:{port}", "--no-control-socket",
                             "services.orders.wsgi:app"],
                            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    for _ in range(200):
        try:
            if requests.get(base + "/healthz", timeout=1).ok:
                break
        except requests.RequestException:
            time.sleep(0.1)
    yield app, base, proc
    proc.terminate()
    proc.wait(15)


def test_a_50_mb_upload_does_not_raise_the_web_process_memory_by_more_than_a_few_mb(web, tmp_path):
    app, base, proc = web
    agent = ApiClient(app).agent("Big Uploader")
    headers = {"Authorization": f"Bearer {agent.token}", "Content-Type": f"multipart/form-data; boundary={BOUNDARY}"}
    warm = StreamedUpload(1024 * 1024)  # the same code path once, so imports and buffers are in place
    assert requests.post(base + "/api/uploads", data=warm, headers=headers, timeout=60).status_code == 201
    [worker] = workers_of(proc.pid)
    before = peak_rss_kb(worker)

    body = StreamedUpload(SIZE)
    response = requests.post(base + "/api/uploads", data=body, headers=headers, timeout=120)

    assert response.status_code == 201, response.text
    data = response.json()["data"]
    assert (data["size"], data["media_type"], data["sha256"]) == (SIZE, "document", body.sha256.hexdigest())
    grew_mb = (peak_rss_kb(worker) - before) / 1024
    assert grew_mb < 8, f"the web process's peak memory grew by {grew_mb:.1f} MB for a 50 MB upload"
    stored = [p for p in (tmp_path / "media" / "uploads").iterdir()]
    assert [p.stat().st_size for p in stored if p.name.startswith(data["upload_id"])] == [SIZE]

    one_byte_more = StreamedUpload(SIZE + 1)
    response = requests.post(base + "/api/uploads", data=one_byte_more, headers=headers, timeout=120)
    assert response.status_code == 413 and response.json()["code"] == "too_large"
