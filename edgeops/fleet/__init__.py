"""The fleet service: device and release registries, rollouts, telemetry store, alerts, metrics, dashboard."""
