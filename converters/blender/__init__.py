"""GLB -> USDZ conversion and preview renders on a pool of warm Blender processes (see README.md here).

Import `converters.blender.pool.BlenderPool` in the service; only `worker.py`, `usdz.py` (and `texbake.py`, which
they use) run inside the Blender interpreter.
"""
