"""Discovery: mDNS hints and static peers, admission by proof of the cluster secret.

The daemon uses :class:`Discovery` (see docs/discovery.md for the contract);
cluster formation itself is the pure :mod:`meshcloud.core.formation`.
"""

from meshcloud.discovery.admission import AdmittedPeer
from meshcloud.discovery.records import SERVICE_TYPE, RackReport
from meshcloud.discovery.service import Discovery, LocalRack

__all__ = ["SERVICE_TYPE", "AdmittedPeer", "Discovery", "LocalRack", "RackReport"]
