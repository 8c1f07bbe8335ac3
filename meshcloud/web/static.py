"""The console's files, served by every rack from memory (gzip-compressed once at start).

``/`` is the console's single page, with the language chosen from the
``mc_lang`` cookie or the browser's Accept-Language and that language's
catalog embedded (one round trip less on a slow link). Asset URLs carry a
hash of every asset (``/static/HASH/app.js``) so that browsers may cache them for good.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import mimetypes
from dataclasses import dataclass
from functools import cache
from importlib import resources
from importlib.resources.abc import Traversable

from aiohttp import web

STATIC_PREFIX = "/static/"
LANG_COOKIE = "mc_lang"
DEFAULT_LANG = "en"
RTL_LANGS = frozenset({"ar", "fa", "he", "ur"})
_TYPES = {
    ".js": "text/javascript",
    ".css": "text/css",
    ".json": "application/json",
    ".svg": "image/svg+xml",
    ".html": "text/html",
}


@dataclass(frozen=True)
class Asset:
    body: bytes
    gzipped: bytes
    content_type: str
    etag: str


def _walk(node: Traversable, prefix: str = "") -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    for child in node.iterdir():
        name = prefix + child.name
        if child.is_dir():
            files.update(_walk(child, name + "/"))
        elif not child.name.startswith("."):
            files[name] = child.read_bytes()
    return files


@cache
def assets() -> tuple[dict[str, Asset], str]:
    """Every console file by path under static/, and a version hash of them all."""
    root = resources.files("meshcloud.web").joinpath("static")
    files = _walk(root)
    version = hashlib.sha256()
    table: dict[str, Asset] = {}
    for path, body in sorted(files.items()):
        version.update(path.encode() + b"\0" + body)
        suffix = "." + path.rsplit(".", 1)[-1]
        ctype = _TYPES.get(suffix) or mimetypes.guess_type(path)[0] or "application/octet-stream"
        etag = '"' + hashlib.sha256(body).hexdigest()[:16] + '"'
        table[path] = Asset(body, gzip.compress(body, 9, mtime=0), ctype, etag)
    return table, version.hexdigest()[:12]


def languages() -> dict[str, str]:
    """Available catalogs: code -> the language's own name."""
    table, _ = assets()
    out = {}
    for path, asset in table.items():
        if path.startswith("i18n/") and path.endswith(".json"):
            code = path[5:-5]
            out[code] = json.loads(asset.body).get("_meta", {}).get("name", code)
    return out


def choose_language(request: web.Request) -> str:
    known = languages()
    cookie = request.cookies.get(LANG_COOKIE, "")
    if cookie in known:
        return cookie
    for part in request.headers.get("Accept-Language", "").split(","):
        code = part.split(";")[0].strip().lower().split("-")[0]
        if code in known:
            return code
    return DEFAULT_LANG


def _send(request: web.Request, body: bytes, gzipped: bytes, ctype: str, etag: str,
          cache_control: str) -> web.Response:  # fmt: skip
    if request.headers.get("If-None-Match") == etag:
        return web.Response(status=304, headers={"ETag": etag, "Cache-Control": cache_control})
    headers = {"ETag": etag, "Cache-Control": cache_control, "Vary": "Accept-Encoding"}
    if "gzip" in request.headers.get("Accept-Encoding", ""):
        headers["Content-Encoding"] = "gzip"
        body = gzipped
    charset = "; charset=utf-8" if ctype.startswith("text/") or ctype.endswith("json") else ""
    headers["Content-Type"] = ctype + charset
    return web.Response(body=body, headers=headers)


@cache
def _index(lang: str) -> tuple[bytes, bytes, str]:
    table, version = assets()
    catalog = table[f"i18n/{lang}.json"].body.decode()
    # JSON inside <script type="application/json">: "<" is escaped so it cannot end the element
    page = (
        table["index.html"]
        .body.decode()
        .replace("{{lang}}", lang)
        .replace("{{dir}}", "rtl" if lang in RTL_LANGS else "ltr")
        .replace("{{v}}", version)
        .replace("{{catalog}}", catalog.replace("<", "\\u003c"))
        .replace("{{languages}}", json.dumps(languages()).replace("<", "\\u003c"))
    ).encode()
    etag = '"' + hashlib.sha256(page).hexdigest()[:16] + '"'
    return page, gzip.compress(page, 9, mtime=0), etag


async def index(request: web.Request) -> web.Response:
    page, gzipped, etag = _index(choose_language(request))
    return _send(request, page, gzipped, "text/html", etag, "no-cache")


async def static_file(request: web.Request) -> web.Response:
    """``/static/VERSION/PATH``: cached for good when VERSION is the current one.

    The version is a path segment (not a query) so that the modules' relative
    imports keep it and the browser fetches each file once.
    """
    table, version = assets()
    given, _, path = request.match_info["path"].partition("/")
    asset = table.get(path)
    if asset is None or path == "index.html":
        raise web.HTTPNotFound(text=f"no console file {path}")
    immutable = given == version
    cache_control = "public, max-age=31536000, immutable" if immutable else "no-cache"
    return _send(request, asset.body, asset.gzipped, asset.content_type, asset.etag, cache_control)
