"""Cheap checks of a GLB before it reaches Blender: size, header, and the face count its JSON declares.

Runs in the pool's process (no bpy): a file that is empty, not a GLB, or too large is refused without using a
worker, and a mesh too large for a worker's memory never gets loaded.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

from pipeline.errors import StageError

GLB_MAGIC = b"glTF"
JSON_CHUNK = 0x4E4F534A
TRIANGLES = 4
# A job's words for a mesh refused, whichever check meets it first: this one, or Blender's import (usdz.py).
NO_GEOMETRY = "The 3D model file contains no geometry."


def too_many_faces(faces: int, max_faces: int) -> str:
    return (f"The 3D model has too many faces ({faces}, at most {max_faces}); ask for a face_limit of at most "
            f"{max_faces}, or a lower resolution.")


def _declared_faces(document: dict[str, Any]) -> int:
    """Triangles declared by the meshes' primitives (index count / 3, else vertex count / 3)."""
    accessors = document.get("accessors", [])
    faces = 0
    for mesh in document.get("meshes", []):
        for primitive in mesh.get("primitives", []):
            if primitive.get("mode", TRIANGLES) != TRIANGLES:
                continue
            source = primitive.get("indices", primitive.get("attributes", {}).get("POSITION"))
            if isinstance(source, int) and 0 <= source < len(accessors):
                faces += int(accessors[source].get("count", 0)) // 3
    return faces


def _read_json_chunk(path: Path) -> dict[str, Any]:
    with path.open("rb") as glb:
        header = glb.read(20)
        if len(header) < 20 or header[:4] != GLB_MAGIC:
            raise StageError("The 3D model file is not a GLB (binary glTF) file.")
        version, _length, chunk_length, chunk_type = struct.unpack("<IIII", header[4:20])
        if version != 2 or chunk_type != JSON_CHUNK:
            raise StageError("The 3D model file is not a glTF 2.0 GLB file.")
        try:
            document = json.loads(glb.read(chunk_length))
        except (UnicodeDecodeError, ValueError):
            raise StageError("The 3D model file is corrupt: its glTF description cannot be read.") from None
    if not isinstance(document, dict):
        raise StageError("The 3D model file is corrupt: its glTF description cannot be read.")
    return document


def check_glb(path: Path, max_bytes: int, max_faces: int) -> int:
    """Raise StageError when `path` cannot or should not be converted; return the declared face count."""
    try:
        size = path.stat().st_size
    except OSError:
        raise StageError("The 3D model file is missing.") from None
    if size == 0:
        raise StageError("The 3D model file is empty.")
    if size > max_bytes:
        raise StageError(f"The 3D model file is too large ({size // 2**20} MiB, at most {max_bytes // 2**20} MiB).")
    faces = _declared_faces(_read_json_chunk(path))
    if faces == 0:
        raise StageError(NO_GEOMETRY)
    if faces > max_faces:
        raise StageError(too_many_faces(faces, max_faces))
    return faces
