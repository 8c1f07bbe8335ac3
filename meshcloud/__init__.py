"""meshcloud: a self-healing cloud of VM appliances on a few edge racks."""

__version__ = "0.1.0"
