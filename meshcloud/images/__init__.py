"""Images: the demo appliance (and later the rack OS image, kits and flashing)."""
