"""Benchmark suites behind ``pyoptk bench`` (timing harness, layouts, suites)."""
