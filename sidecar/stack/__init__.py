"""The local stack behind `sidecar up` and the real-Envoy test harness.

Envoy, the ext_proc sidecar and a demo backend, all on loopback.
"""
