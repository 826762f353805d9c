"""Test support: real services the tests start and stop themselves (mosquitto)."""
