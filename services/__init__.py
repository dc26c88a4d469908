"""The stage service: one pipeline stage as a gRPC server around one engine."""
