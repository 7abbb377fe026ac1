"""Benchmarks for tvq-eqx: scaling, decoding, quality (see docs/benchmarks.md).

Run `python -m benchmarks.run scaling|decode|quality|all [--quick]`.
"""
