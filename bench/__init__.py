"""Tools that run authgate hard: benchmarks (loadgen, serve, compare; see
README.md) and anything else that is too slow for the test suite."""
