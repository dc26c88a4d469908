"""The orchestrator service: chains stages and drives profiling across them."""
