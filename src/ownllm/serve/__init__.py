"""Serve: an OpenAI-compatible HTTP server over the engine, with continuous batching."""
