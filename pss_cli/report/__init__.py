"""Renderers of result data (tables, JSON) and stderr progress. No numerics, no checkpoint I/O."""
