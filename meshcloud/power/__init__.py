"""Power sources (a UPS through Network UPS Tools, or plain mains) and the rack's reporter."""
