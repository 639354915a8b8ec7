"""The benchmark: the dispatcher against direct TorchServe on a real local stack.

`python -m bench` runs every scenario and writes docs/BENCHMARKS.md; `--smoke` runs
the same code with tiny counts (tests/test_bench_smoke.py); `--profile` adds py-spy profiles.
"""
