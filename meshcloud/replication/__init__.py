"""Replication: crash-consistent replicas of each appliance's disks on other racks.

See docs/replication.md. The daemon uses :class:`~meshcloud.replication.source.ApplianceSource`
(primary side), :class:`~meshcloud.replication.store.ReplicaStore` (receiving side)
and :class:`~meshcloud.replication.engine.ReplicationEngine` (scheduling both).
"""
