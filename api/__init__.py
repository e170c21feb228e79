"""obdconv's HTTP API (FastAPI): other services enqueue, follow and cancel conversions over HTTP,
and registries turn pushes into conversions. See api/README.md. The core library never imports it."""
