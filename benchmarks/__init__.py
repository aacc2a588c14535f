"""Benchmarks, one script per measured claim; each runs from the project root as ``python -m benchmarks.<script>``
(docs/benchmarks.md). ``cli_options`` holds their shared parser pieces."""
