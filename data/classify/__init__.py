"""Data builders, runnable as modules from the project root: python -m data.build_pretrain_data, ..."""
