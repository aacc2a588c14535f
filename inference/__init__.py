"""Inference on top of ``decoding.py`` and ``checkpoints.py``: the INT8 CLI (``quantizer``), generation, streaming and
the terminal chat (``kv_cache_infer``), the HTTP server (``api_service``: the app and routes, on ``settings``,
``schemas``, ``openai_format``, ``serving``, ``engine_worker`` and ``server_metrics``) and its Locust load test
(``load_test``); each CLI is ``python -m inference.<module>``."""
