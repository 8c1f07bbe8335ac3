"""aiohttp: the JSON API, server-sent events and the web console."""
