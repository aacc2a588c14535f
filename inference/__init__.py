"""Inference on top of ``decoding.py`` and ``checkpoints.py``: the INT8 CLI (``inference.quantizer``), generation,
streaming and terminal chat (``inference.kv_cache_infer``), the HTTP server (``inference.api_service``) and its Locust
load test (``inference.load_test``); each CLI is ``python -m inference.<module>``."""
