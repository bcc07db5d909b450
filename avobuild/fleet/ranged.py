"""Sending a file with HTTP range requests and a strong, content-derived ETag (RFC 9110).

Devices resume interrupted downloads with `Range: bytes=N-`, guarded by `If-Range: "<etag>"`
so a resume never splices two different files. The ETag is the file's sha256 from the signed
index, so every server instance (and the device, which knows the hash) agrees on it. Only a
single range is honoured: a multi-range request gets the whole file (RFC 9110 allows
ignoring Range), an unsatisfiable one 416 with `Content-Range: bytes */SIZE`.

aiohttp's FileResponse is not used: its If-Range compares dates only (an ETag there is
ignored and a stale range served), and its ETag comes from the file's mtime, which differs
between servers. Files are read in 256 KiB blocks off the event loop.
"""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

from aiohttp import web

_RANGE = re.compile(r"bytes=([0-9]{0,19})-([0-9]{0,19})")
BLOCK = 256 << 10


def parse_range(value: str | None, size: int) -> tuple[int, int] | bool | None:
    """(first, last) byte, None for the whole file, False when unsatisfiable."""
    if value is None:
        return None
    match = _RANGE.fullmatch(value.strip())
    if match is None or not (match.group(1) or match.group(2)):
        return None
    if not match.group(1):
        suffix = int(match.group(2))
        if suffix == 0 or size == 0:
            return False
        return max(0, size - suffix), size - 1
    first = int(match.group(1))
    last = int(match.group(2)) if match.group(2) else size - 1
    if first >= size:
        return False
    if last < first:
        return None
    return first, min(last, size - 1)


def _matches(header: str, tag: str) -> bool:
    """If-None-Match: weak comparison over a list of tags, or `*`."""
    candidates = [candidate.strip() for candidate in header.split(",")]
    return "*" in candidates or tag in (c.removeprefix("W/") for c in candidates)


async def send_file(
    request: web.Request,
    path: Path,
    sha256: str,
    size: int,
    *,
    cache_control: str,
    content_type: str = "application/octet-stream",
) -> web.StreamResponse:
    tag = f'"{sha256}"'
    headers = {
        "ETag": tag,
        "Accept-Ranges": "bytes",
        "Cache-Control": cache_control,
        "Content-Type": content_type,
    }
    if_none_match = request.headers.get("If-None-Match")
    if if_none_match is not None and _matches(if_none_match, tag):
        return web.Response(status=304, headers=headers)
    wanted = parse_range(request.headers.get("Range"), size)
    if_range = request.headers.get("If-Range")
    if if_range is not None and if_range.strip() != tag:
        # Strong comparison; a date never matches a content hash, so the whole file is sent.
        wanted = None
    if wanted is False:
        headers["Content-Range"] = f"bytes */{size}"
        return web.json_response(
            {"error": f"range not satisfiable: the file has {size} bytes", "status": 416},
            status=416,
            headers={k: v for k, v in headers.items() if k != "Content-Type"},
        )
    first, last = wanted if isinstance(wanted, tuple) else (0, size - 1)
    response = web.StreamResponse(status=206 if isinstance(wanted, tuple) else 200, headers=headers)
    if isinstance(wanted, tuple):
        response.headers["Content-Range"] = f"bytes {first}-{last}/{size}"
    response.content_length = last - first + 1
    await response.prepare(request)
    if request.method == "HEAD" or size == 0:
        await response.write_eof()
        return response
    loop = asyncio.get_running_loop()
    with path.open("rb") as handle:
        handle.seek(first)
        left = last - first + 1
        while left:
            block = await loop.run_in_executor(None, handle.read, min(left, BLOCK))
            if not block:
                # The file shrank under us: end the response short rather than pad it.
                raise ConnectionResetError(f"{path}: shorter than the {size} bytes expected")
            await response.write(block)
            left -= len(block)
    await response.write_eof()
    return response
