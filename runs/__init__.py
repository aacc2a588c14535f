"""Prepared runs that chain the project's documented CLIs: ``python -m runs.speedrun`` takes a machine from raw text to
a served chat model (tokenizer, pretraining, SFT, benchmarks, a report, the server)."""
