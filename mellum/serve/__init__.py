"""Serving: the LSP server, the HTTP API and the telemetry store, all thin layers over the completion service."""
