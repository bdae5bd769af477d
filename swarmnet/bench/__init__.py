"""Benchmarks: each measures swarmnet against a baseline side by side in one run and reports the
ratio (``swarmnet bench ...``); results are recorded in docs/benchmarks.md."""
