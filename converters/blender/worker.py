"""A long-lived Blender process: reads one request at a time from its channel, answers on the same channel.

Run by the pool as `<blender python> -m converters.blender.worker --fd N`, where N is one end of a socket pair.
`--convert GLB USDZ [--bake-size N]` does one conversion in a fresh process and exits (the benchmark's cold case).
bpy prints to stdout, so replies never go there: the channel carries JSON lines only.

Request: {"id": int, "op": "convert" | "export" | "render" | "ping", "glb": str, "out": str, "bake_size": int,
          "max_faces": int, "size": int, "format": "glb_textured" | "fbx" | "obj" (export only)}
Reply:   {"id": int, "ok": bool, "error": str | None, "bug": bool, "result": {...},
          "counts": {"objects", "meshes", "materials", "images"} after the reset, "rss_mb": float, "seconds": float}
The worker exits when the channel closes (the pool closed it), and dies with the pool's process even in the middle
of a request (pipeline/lifeline.py: the kernel's parent-death signal, armed first thing in `main`).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import time
import traceback
from pathlib import Path
from typing import Any, BinaryIO

from pipeline import lifeline


def rss_mb() -> float:
    """Resident memory of this process, read from /proc (Linux), in MB."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return 0.0


def handle(request: dict[str, Any]) -> dict[str, Any]:
    """Run one request; input problems come back as `error`, anything else as a `bug` with its traceback."""
    from converters.blender import formats, usdz  # import bpy: only inside the worker process

    op = request.get("op")
    try:
        if op == "convert":
            result = usdz.convert(Path(request["glb"]), Path(request["out"]), int(request["bake_size"]), int(request["max_faces"]))
        elif op == "export":
            result = formats.export(Path(request["glb"]), Path(request["out"]), str(request["format"]),
                                    int(request["bake_size"]), int(request["max_faces"]))
        elif op == "render":
            result = usdz.render_preview(Path(request["glb"]), Path(request["out"]), int(request["size"]), int(request["max_faces"]))
        elif op == "ping":
            result = {}
        else:
            return {"ok": False, "bug": True, "error": f"unknown op {op!r}"}
        return {"ok": True, "bug": False, "error": None, "result": result}
    except usdz.ConversionError as exc:
        return {"ok": False, "bug": False, "error": str(exc)}
    except Exception:  # a bug: the pool logs the traceback and shows the user a generic sentence
        return {"ok": False, "bug": True, "error": traceback.format_exc(limit=8)}


def send(out: BinaryIO, message: dict[str, Any]) -> None:
    out.write(json.dumps(message).encode() + b"\n")
    out.flush()


def serve(channel: socket.socket) -> None:
    from converters.blender import usdz

    reader, writer = channel.makefile("rb"), channel.makefile("wb")
    usdz.reset_scene()
    send(writer, {"ready": True, "pid": os.getpid(), "counts": usdz.scene_counts(), "rss_mb": rss_mb()})
    for line in reader:  # ends at EOF: the pool is gone or closing
        request = json.loads(line)
        started = time.perf_counter()
        reply = handle(request)
        reply.update(
            id=request.get("id"),
            counts=usdz.scene_counts(),
            rss_mb=rss_mb(),
            seconds=time.perf_counter() - started,
        )
        send(writer, reply)


def main() -> None:
    lifeline.hold()  # before bpy's seconds of imports: a pool that dies meanwhile takes this worker with it
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--fd", type=int, help="file descriptor of the channel socket (pool mode)")
    parser.add_argument("--convert", nargs=2, metavar=("GLB", "USDZ"), help="one conversion, then exit (benchmarks)")
    parser.add_argument("--bake-size", type=int, default=1024)
    parser.add_argument("--max-faces", type=int, default=1_000_000)
    args = parser.parse_args()
    if args.convert:
        from converters.blender import usdz

        usdz.convert(Path(args.convert[0]), Path(args.convert[1]), args.bake_size, args.max_faces)
    elif args.fd is not None:
        serve(socket.socket(fileno=args.fd))
    else:
        parser.error("give --fd (pool mode) or --convert GLB USDZ")


if __name__ == "__main__":
    main()
