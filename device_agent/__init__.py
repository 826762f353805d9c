"""edgeops-agent: the on-device daemon (Raspberry Pi, Jetson, x86 gateways).

Dependency rule: this package imports only the light core of :mod:`edgeops` (errors, artifact, signing,
manifest, runtime, atomic_file, protocol), the standard library, numpy, cryptography, paho-mqtt and an inference
runtime — never tensorflow, onnx, coremltools or :mod:`converters`. tests/device_agent checks this in a fresh
interpreter. docs/agent.md describes the modules and how data flows through them.
"""

from edgeops import __version__

__all__ = ["__version__"]
