"""Quantizer fixtures live in tests/conftest.py (shared with the service tests)."""
