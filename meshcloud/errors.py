"""Re-export of the error hierarchy, which lives in the pure core."""

from meshcloud.core.errors import (
    ConfigError,
    Conflict,
    HypervisorError,
    InvalidInput,
    MeshcloudError,
    NotFound,
    ReplicationError,
    Unavailable,
)

__all__ = [
    "ConfigError",
    "Conflict",
    "HypervisorError",
    "InvalidInput",
    "MeshcloudError",
    "NotFound",
    "ReplicationError",
    "Unavailable",
]
