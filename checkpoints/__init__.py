"""Sharded, atomically committed checkpoints."""
