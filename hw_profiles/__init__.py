"""Built-in hardware profiles: one TOML file per device class (data, not code; see docs/profiles.md)."""
