"""Profiling support for the stage service: sessions, traces and op tables."""
