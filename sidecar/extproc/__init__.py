"""The ext_proc gRPC server: stream state machine, header/body mutation model, workers, health."""
