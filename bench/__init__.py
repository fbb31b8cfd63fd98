"""callbridge benchmarks: see bench/README.md; run with ``python -m bench``."""
