"""Benchmarks: the dispatcher against the emulator (and the official SDK's worker as a peer)."""
