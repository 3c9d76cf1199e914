"""One small interface over local directories (and, behind the same calls, object storage).

Paths are strings: a local path or a URI. Writes are atomic: a reader sees the old object or the new one,
never a partial one (local: write a temporary file, fsync, rename).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


class LocalStorage:
    """A directory tree on a local or mounted filesystem."""

    def __init__(self, root: str):
        self.root = root

    def join(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    def put_bytes(self, path: str, data: bytes) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    def get_bytes(self, path: str) -> bytes:
        with open(path, "rb") as f:
            return f.read()

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def size(self, path: str) -> int:
        return os.path.getsize(path)

    def list_dirs(self, path: str) -> list[str]:
        if not os.path.isdir(path):
            return []
        return sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d)))

    def delete_tree(self, path: str) -> None:
        shutil.rmtree(path, ignore_errors=True)


def open_storage(root: str) -> LocalStorage:
    """The backend for ``root`` (a local path; ``s3://`` URIs are served by the object-storage backend)."""
    if "://" in root:
        scheme = root.split("://", 1)[0]
        raise ValueError(f"{root}: storage scheme {scheme}:// is not supported by this build; use a local path")
    return LocalStorage(root)
