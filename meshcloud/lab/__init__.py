"""Several racks on one machine, each in its own network namespace."""
