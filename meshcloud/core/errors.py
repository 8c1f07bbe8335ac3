"""The error hierarchy. Messages say what happened and what to do."""


class MeshcloudError(Exception):
    """Root of every error meshcloud raises on purpose."""


class InvalidInput(MeshcloudError):
    """A name, spec or request is malformed; nothing was changed."""


class ConfigError(MeshcloudError):
    """The daemon's configuration is invalid; the message names the key and the rule."""


class NotFound(MeshcloudError):
    """The named object does not exist."""


class Conflict(MeshcloudError):
    """The request conflicts with the current state (stale epoch, name taken, ...)."""


class Unavailable(MeshcloudError):
    """The cluster cannot serve the request now (no leader, no quorum); retry later."""


class HypervisorError(MeshcloudError):
    """The hypervisor refused or failed an operation."""


class ReplicationError(MeshcloudError):
    """A replication transfer or apply failed; the previous generation is intact."""
