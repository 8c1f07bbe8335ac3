"""The replicated placement map: Raft on pysyncobj 0.3.17, hardened (see docs/raft.md).

Use :class:`meshcloud.raft.store.PlacementStore` (implemented by
:class:`meshcloud.raft.syncobj_store.SyncObjStore`); the state machine itself
is pure and lives in :mod:`meshcloud.core.state`.
"""
