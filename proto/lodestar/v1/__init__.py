"""Generated code of the gRPC contract `lodestar.v1` (see services/protos.py)."""
