"""`meshcloud daemon` imports aiohttp lean, and leaves the environment as it found it."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def test_lean_imports_restore_the_environment_and_skip_the_system_tables() -> None:
    code = """
import json, os, sys
os.environ["SSL_CERT_DIR"] = "/etc/ssl/certs"
from meshcloud.cli import _lean_imports
_lean_imports()
import mimetypes
print(json.dumps({
    "aiohttp": "aiohttp" in sys.modules,
    "cert_file": os.environ.get("SSL_CERT_FILE"),
    "cert_dir": os.environ.get("SSL_CERT_DIR"),
    "knownfiles": mimetypes.knownfiles,
}))
"""
    env = {k: v for k, v in os.environ.items() if k not in ("SSL_CERT_FILE", "SSL_CERT_DIR")}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
        timeout=60,
    ).stdout  # fmt: skip
    doc = json.loads(out)
    assert doc == {
        "aiohttp": True,
        "cert_file": None,  # was unset: unset again
        "cert_dir": "/etc/ssl/certs",  # was set: restored
        "knownfiles": [],
    }


def test_the_console_serves_its_files_with_its_own_types_without_the_system_table() -> None:
    from meshcloud.web.static import assets

    table, _version = assets()
    assert {a.content_type for a in table.values()} <= {
        "text/javascript",
        "text/css",
        "application/json",
        "image/svg+xml",
        "text/html",
    }
