"""Envoy config writers: from the sidecar's own config and from Envoy Gateway resources."""

from sidecar.translate.dataplane import keep_warnings_inside

keep_warnings_inside()
