"""dcp checkpoint format (see docs/ARCHITECTURE.md, "Adding a checkpoint format")."""
