"""Jitted, sharded phase programs and the one batching path (DESIGN.md "engine/")."""
