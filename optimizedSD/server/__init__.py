"""The HTTP server: AUTOMATIC1111's webui API (v1.10 shapes) over the scripts' generation run, with the model
kept loaded (``optimizedSD/optimized_server.py``; docs/architecture.md)."""
