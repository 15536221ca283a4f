"""`sidecar up`: real Envoy + the sidecar + a demo backend on localhost."""
