"""Helpers for the Blender tests: synthetic TripoSR-like meshes and a USDZ inspector."""
