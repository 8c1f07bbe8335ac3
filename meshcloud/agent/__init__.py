"""The rack's control loops: read a snapshot, decide in core, act through adapters."""
