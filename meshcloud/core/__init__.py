"""Pure logic: models, validation, placement, failover decisions, leases.

Nothing here does I/O, touches a clock or imports another meshcloud package.
"""
