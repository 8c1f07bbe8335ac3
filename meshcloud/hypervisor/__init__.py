"""Hypervisor adapter: domain XML from specs, lifecycle, events (libvirt).

Importing this package points libvirt's own log at a file before libvirt is
imported (see :func:`send_libvirt_log_to_a_file`).
"""

from __future__ import annotations

import os
from pathlib import Path

LIBVIRT_LOG = Path("/run/meshcloud/libvirt.log")


def send_libvirt_log_to_a_file() -> None:
    """In-process (embedded) libvirt logs warnings and errors to stderr; send them to a file.

    libvirt reads LIBVIRT_LOG_OUTPUTS once, when it is first imported, so this
    runs when this package is imported, before any of its modules imports
    libvirt. A value the operator set wins.
    """
    if "LIBVIRT_LOG_OUTPUTS" in os.environ or os.geteuid() != 0:
        return
    try:
        LIBVIRT_LOG.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError:
        return
    os.environ["LIBVIRT_LOG_OUTPUTS"] = f"3:file:{LIBVIRT_LOG}"


send_libvirt_log_to_a_file()
