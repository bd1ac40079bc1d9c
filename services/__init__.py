"""The front door: CLI, and (later) the gRPC server and batch jobs."""
