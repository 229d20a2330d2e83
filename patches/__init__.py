"""Compatibility patches for upstream projects: each names the version it targets, is applied by an
explicit call, is undone cleanly, and has a test (tests/test_megatron.py)."""
