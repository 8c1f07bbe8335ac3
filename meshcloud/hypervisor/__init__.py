"""Hypervisor adapter: domain XML from specs, lifecycle, events (libvirt)."""
