"""The JSON API behind the web UI (`/api/...`): thin handlers over the services."""
