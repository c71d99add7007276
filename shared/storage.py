"""Where files live: one small interface, a local folder by default.

Keys are relative paths such as `uploads/<id>` or `previews/<hash>.jpg`. Writes are atomic (a
temporary file in the same store, then a rename), so a reader never sees half a file and a
crashed writer leaves no partial object behind. An S3-compatible store implements the same
methods (put from a file, open for reading, exists, size, delete)."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO, Protocol

from shared.settings import Settings

CHUNK = 1024 * 1024


class Storage(Protocol):
    def temp_file(self) -> BinaryIO: ...

    def adopt(self, temp: BinaryIO, key: str) -> None: ...

    def discard(self, temp: BinaryIO) -> None: ...

    def put_bytes(self, key: str, data: bytes) -> None: ...

    def put_file(self, key: str, source: BinaryIO) -> None: ...

    def open(self, key: str) -> BinaryIO: ...

    def exists(self, key: str) -> bool: ...

    def size(self, key: str) -> int: ...

    def delete(self, key: str) -> None: ...

    def local_path(self, key: str) -> Path | None: ...


class LocalStorage:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.tmp = self.root / ".tmp"
        self.tmp.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if self.root.resolve() not in path.parents or key.startswith("."):
            raise ValueError(f"storage key outside the store: {key!r}")
        return path

    def temp_file(self) -> BinaryIO:
        """A file to stream into; `adopt` then moves it to its key without copying."""
        return tempfile.NamedTemporaryFile(dir=self.tmp, delete=False)

    def adopt(self, temp: BinaryIO, key: str) -> None:
        temp.flush()
        os.fsync(temp.fileno())
        temp.close()
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(temp.name, target)

    def discard(self, temp: BinaryIO) -> None:
        temp.close()
        try:
            os.unlink(temp.name)
        except FileNotFoundError:
            pass

    def put_bytes(self, key: str, data: bytes) -> None:
        temp = self.temp_file()
        try:
            temp.write(data)
            self.adopt(temp, key)
        except BaseException:
            self.discard(temp)
            raise

    def put_file(self, key: str, source: BinaryIO) -> None:
        temp = self.temp_file()
        try:
            shutil.copyfileobj(source, temp, CHUNK)
            self.adopt(temp, key)
        except BaseException:
            self.discard(temp)
            raise

    def open(self, key: str) -> BinaryIO:
        return open(self._path(key), "rb")

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def size(self, key: str) -> int:
        return self._path(key).stat().st_size

    def delete(self, key: str) -> None:
        try:
            self._path(key).unlink()
        except FileNotFoundError:
            pass

    def local_path(self, key: str) -> Path | None:
        return self._path(key)


def make_storage(settings: Settings) -> LocalStorage:
    return LocalStorage(settings.media_path)
