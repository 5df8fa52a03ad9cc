"""Checkpoints: full (unsharded) state gathered from any layout; sharded save/load."""
