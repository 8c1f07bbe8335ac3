"""The one clock leases use: monotonic, and it keeps counting through suspend."""

import time


def now() -> float:
    """Seconds on CLOCK_BOOTTIME (comparable only on this host)."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)
