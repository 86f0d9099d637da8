"""Checkpoint formats: one sub-package per format, each implementing ``CheckpointFormat``
(protocol.py), listed once in registry.py (docs/ARCHITECTURE.md, "Adding a checkpoint
format")."""
