"""edgeops-agent: the on-device daemon (Raspberry Pi, Jetson).

Dependency rule: this package imports only the light core of :mod:`edgeops` (artifact, signing, manifest,
runtime), the standard library, numpy, cryptography, paho-mqtt and an inference runtime — never tensorflow,
onnx, coremltools or :mod:`converters`. tests/device_agent checks this in a fresh interpreter.

This release carries the agent's artifact checks (``edgeops-agent check``); the daemon (slots, health gate,
MQTT, telemetry) is the next milestone (docs/agent.md).
"""

__all__: list[str] = []
