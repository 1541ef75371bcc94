"""The classifier.v1 client library (sync and asyncio), its CLI and tools (load generator, demo)."""
