"""Envoy config writers: from the sidecar's own config and from Envoy Gateway resources."""
