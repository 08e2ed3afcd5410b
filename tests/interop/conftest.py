"""The interop tests use the one test harness (tests/harness.py: a real Coordinator subprocess)."""
