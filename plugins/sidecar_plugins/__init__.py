"""Reference plugins shipped with envoy-sidecar (importable as `sidecar_plugins`); each doubles as documentation."""
