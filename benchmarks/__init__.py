"""Benchmarks of the deepencoder tower (not installed; run from the repository root, e.g.
`python -m benchmarks.tower --device cpu --dtype fp32 --quick`)."""
