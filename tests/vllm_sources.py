"""A few Python files of a released vLLM, fetched from PyPI for feature tests.

The patch ledger's tests read vLLM's own sources of the oldest supported and a
newer release, whichever vLLM is installed. A wheel is a zip whose table of
contents sits at its end, so only that table and the wanted members travel
(HTTP range requests: about a megabyte instead of 250 MB). Files are cached in
``~/.cache/vllm-dflash/vllm-src/<version>/``; tests skip, saying why, when
PyPI cannot be reached and the cache is empty.
"""

from __future__ import annotations

import io
import json
import os
import urllib.request
import zipfile
from pathlib import Path

import pytest

INDEX = "https://pypi.org/simple/vllm/"
CACHE = Path(
    os.environ.get("VLLM_DFLASH_CACHE", Path.home() / ".cache" / "vllm-dflash")
)
CHUNK = 1 << 18


class _RangeFile(io.RawIOBase):
    """A read-only, seekable view of a remote file through HTTP ranges."""

    def __init__(self, url: str, size: int) -> None:
        self.url, self.size, self.pos = url, size, 0
        self._blocks: dict[int, bytes] = {}

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self.pos, 2: self.size}[whence]
        self.pos = base + offset
        return self.pos

    def _block(self, index: int) -> bytes:
        if index not in self._blocks:
            start = index * CHUNK
            end = min(start + CHUNK, self.size) - 1
            req = urllib.request.Request(
                self.url, headers={"Range": f"bytes={start}-{end}"}
            )
            with urllib.request.urlopen(req, timeout=60) as resp:
                self._blocks[index] = resp.read()
        return self._blocks[index]

    def readinto(self, buf) -> int:  # type: ignore[no-untyped-def]
        n = min(len(buf), self.size - self.pos)
        out = bytearray()
        while len(out) < n:
            index, offset = divmod(self.pos + len(out), CHUNK)
            out += self._block(index)[offset : offset + n - len(out)]
        buf[:n] = out
        self.pos += n
        return n


def _wheel(version: str) -> tuple[str, int]:
    req = urllib.request.Request(
        INDEX, headers={"Accept": "application/vnd.pypi.simple.v1+json"}
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        files = json.load(resp)["files"]
    for f in files:
        name = f["filename"]
        if name.startswith(f"vllm-{version}-") and name.endswith("_x86_64.whl"):
            return f["url"], int(f["size"])
    raise LookupError(f"no x86_64 wheel of vllm {version} on PyPI")


def vllm_sources(version: str, paths: list[str]) -> Path:
    """Root under which ``vllm/<path>`` of vLLM ``version`` exist (cached)."""
    root = CACHE / "vllm-src" / version
    missing = [p for p in paths if not (root / "vllm" / p).exists()]
    if not missing:
        return root
    try:
        url, size = _wheel(version)
        with zipfile.ZipFile(io.BufferedReader(_RangeFile(url, size), CHUNK)) as whl:
            for path in missing:
                dest = root / "vllm" / path
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(whl.read(f"vllm/{path}"))
    except OSError as e:  # URLError is an OSError
        pytest.skip(
            f"vLLM {version}'s sources are not cached and PyPI is unreachable ({e})"
        )
    return root
