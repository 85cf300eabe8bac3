"""`grok3d generate | status | jobs | cancel | delete | examples`: argparse in front of grok3d_cli.client;
`grok3d keys ...` (grok3d_cli.keys) works on the job store itself.

Exit codes: 0 done; 1 the server said no (bad prompt, unknown job, failed job, timeout waiting); 2 bad usage
(argparse); 3 no usable answer from the server (down, wrong address); 130 interrupted.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from grok3d_cli.client import EXIT_REFUSED, Api, CliError, StreamBroken
from grok3d_cli.keys import add_keys_command
from grok3d_cli.progress import ProgressBar

DEFAULT_SERVER = "http://localhost:8000"
POLL_S = 0.5
STREAM_RETRIES = 3  # reconnections (with Last-Event-ID) before falling back to polling
# asset_type of API.md -> the downloaded file's suffix, in the order a job makes them.
SUFFIXES = {"image": "jpg", "glb": "glb", "usdz": "usdz", "preview": "preview.jpg", "glb_textured": "textured.glb",
            "obj": "obj.zip", "stl": "stl", "3mf": "3mf", "fbx": "fbx"}
DEFAULT_FORMATS = ("image", "glb", "usdz")


def default_server() -> str:
    return os.environ.get("GROK3D_SERVER") or DEFAULT_SERVER


def default_api_key() -> str | None:
    return os.environ.get("GROK3D_API_KEY") or None


def add_common_options(parser: argparse.ArgumentParser, default: Any, default_key: Any = None) -> None:
    """The options every sub-command takes, accepted before the sub-command too (`grok3d --server URL generate`)."""
    parser.add_argument("--server", default=default, metavar="URL",
                        help="the grok3d service (default: $GROK3D_SERVER, else %s)" % DEFAULT_SERVER)
    # A key on the command line shows in `ps` and the shell's history: the environment variable is the safer way.
    parser.add_argument("--api-key", default=default_key, metavar="KEY",
                        help="the API key, for a server in keys mode (default: $GROK3D_API_KEY)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="grok3d", description="Turn a text prompt into a 3D model with grok3d.")
    add_common_options(parser, default_server(), default_api_key())
    # A sub-command's own default would overwrite a value given before the sub-command (argparse applies the
    # sub-parser's defaults last), so there the options have none: given after the sub-command they win, as the
    # nearer one; not given at all, the main parser's default stands.
    common = argparse.ArgumentParser(add_help=False)
    add_common_options(common, argparse.SUPPRESS, argparse.SUPPRESS)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    generate = commands.add_parser("generate", parents=[common], help="make a 3D model from a prompt or a picture",
                                   description="Submit a prompt or a picture, follow the job, download its files "
                                               "(by default its image, GLB and USDZ).")
    generate.add_argument("prompt", nargs="?", help="what to make, e.g. \"a red teapot\"; with --image, a caption")
    generate.add_argument("--image", type=Path, metavar="FILE",
                          help="make the model from this picture (JPEG, PNG or WebP, up to 10 MiB) instead of xAI's")
    generate.add_argument("--resolution", type=int, metavar="N", help="marching-cubes grid, 32 to 512")
    generate.add_argument("--face-limit", type=int, metavar="N", help="at most N triangles (100 to 1000000)")
    generate.add_argument("--size-m", type=float, metavar="METRES", help="largest side of the model, 0.01 to 100")
    generate.add_argument("--format", action="append", metavar="TYPE", type=_formats,
                          help="what to download, comma separated or repeated: %s (default: %s)"
                               % (", ".join(SUFFIXES), ",".join(DEFAULT_FORMATS)))
    generate.add_argument("-o", "--output", type=Path, default=Path("."), metavar="DIR",
                          help="folder for <job_id>.jpg, .glb, .usdz, ... (default: the current folder)")
    generate.add_argument("--timeout", type=float, default=3600.0, metavar="SECONDS",
                          help="give up waiting after this long; the job goes on (default: 3600)")
    generate.set_defaults(run=cmd_generate)

    status = commands.add_parser("status", parents=[common], help="show a job's status")
    status.add_argument("job_id")
    status.add_argument("--json", action="store_true", help="print the API's JSON as it is")
    status.set_defaults(run=cmd_status)

    jobs = commands.add_parser("jobs", parents=[common], help="list your jobs, newest first")
    jobs.add_argument("--limit", type=int, default=20, metavar="N", help="jobs per page, 1 to 100 (default 20)")
    jobs.add_argument("--status", choices=["queued", "processing", "complete", "error"], help="only these")
    jobs.add_argument("--cursor", help="the next page: the cursor the previous page printed")
    jobs.add_argument("--json", action="store_true", help="print the API's JSON as it is")
    jobs.set_defaults(run=cmd_jobs)

    cancel = commands.add_parser("cancel", parents=[common], help="stop a queued or running job")
    cancel.add_argument("job_id")
    cancel.set_defaults(run=cmd_cancel)

    delete = commands.add_parser("delete", parents=[common], help="delete a job and all its files")
    delete.add_argument("job_id")
    delete.set_defaults(run=cmd_delete)

    examples = commands.add_parser("examples", parents=[common], help="list the example models")
    examples.add_argument("--json", action="store_true", help="print the API's JSON as it is")
    examples.set_defaults(run=cmd_examples)

    add_keys_command(commands)
    return parser


def _still_running(job_id: str, status: dict[str, Any], timeout_s: float) -> CliError:
    return CliError(f"job {job_id} is still {status['stage']} after {timeout_s:g} s; it goes on in the "
                    f"server: grok3d status {job_id}", EXIT_REFUSED)


def follow_job(api: Api, job_id: str, timeout_s: float, bar: ProgressBar) -> dict[str, Any]:
    """The job's end, followed over Server-Sent Events (resumed with Last-Event-ID when the stream breaks), or by
    polling once it has broken STREAM_RETRIES times or the server sends none."""
    deadline = time.monotonic() + timeout_s
    last_id: str | None = None
    for _ in range(1 + STREAM_RETRIES):
        try:
            with contextlib.closing(api.events(job_id, last_id)) as events:
                for event in events:
                    last_id = event.id
                    if event.kind == "end" or event.status["status"] in ("complete", "error"):
                        if event.status["status"] != "error":
                            bar.update(event.status)
                        return event.status
                    bar.update(event.status)
                    if time.monotonic() > deadline:
                        raise _still_running(job_id, event.status, timeout_s)
        except StreamBroken:
            pass
        if time.monotonic() > deadline:
            break
    return wait_for_job(api, job_id, max(0.0, deadline - time.monotonic()), bar)


def wait_for_job(api: Api, job_id: str, timeout_s: float, bar: ProgressBar) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        status = api.status(job_id)
        if status["status"] == "error":
            return status  # its reason is the message; a bar at 0% would only confuse
        bar.update(status)
        if status["status"] == "complete":
            return status
        if time.monotonic() > deadline:
            raise _still_running(job_id, status, timeout_s)
        time.sleep(POLL_S)


def _formats(text: str) -> list[str]:
    chosen = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in chosen if name not in SUFFIXES]
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(f"unknown format {', '.join(unknown) or repr(text)}; choose from "
                                         f"{', '.join(SUFFIXES)}")
    return chosen


def cmd_generate(api: Api, args: argparse.Namespace) -> int:
    if args.prompt is None and args.image is None:
        raise CliError("give a prompt, or a picture with --image FILE", 2)
    options = {name: value for name, value in (("resolution", args.resolution), ("face_limit", args.face_limit),
                                               ("size_m", args.size_m)) if value is not None}
    picture = args.image.read_bytes() if args.image is not None else None
    job_id = api.generate(args.prompt, image=picture, image_name=args.image.name if args.image else None,
                          **options)["job_id"]
    print(f"job {job_id} queued", file=sys.stderr)
    bar = ProgressBar()
    try:
        status = follow_job(api, job_id, args.timeout, bar)
    except KeyboardInterrupt:
        raise CliError(f"interrupted; job {job_id} goes on in the server: grok3d status {job_id}", 130) from None
    finally:
        bar.close()
    if status["status"] == "error":
        raise CliError(f"job {job_id} failed: {status.get('error') or 'no reason given'}", EXIT_REFUSED)
    chosen = [name for group in args.format or [list(DEFAULT_FORMATS)] for name in group]
    for asset_type in dict.fromkeys(chosen):  # each once, in the order given
        target = args.output / f"{job_id}.{SUFFIXES[asset_type]}"
        api.download(job_id, asset_type, target)
        print(target)
    return 0


def cmd_status(api: Api, args: argparse.Namespace) -> int:
    status = api.status(args.job_id)
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    fields = ["job_id", "status", "stage", "progress", "prompt", "source", "created_at", "model_version",
              "resolution", "face_limit", "size_m", "error"]
    for name in fields:
        if status.get(name) is not None:
            suffix = "%" if name == "progress" else ""
            print(f"{name + ':':15}{status[name]}{suffix}")
    if mesh := status.get("mesh"):
        volume = f", {mesh['volume_m3']:.6g} m³" if mesh.get("volume_m3") is not None else ""
        size = " x ".join(f"{side:.3f}" for side in mesh["size_m"])
        print(f"{'mesh:':15}{mesh['faces']} faces, {mesh['vertices']} vertices, {size} m, "
              f"{'watertight' if mesh['watertight'] else 'not watertight'}{volume}")
    return 0


def cmd_jobs(api: Api, args: argparse.Namespace) -> int:
    page = api.jobs(limit=args.limit, status=args.status, cursor=args.cursor)
    if args.json:
        print(json.dumps(page, indent=2))
        return 0
    for job in page["jobs"]:
        state = job["status"] if job["status"] in ("queued", "complete", "error") else job["stage"]
        title = job["prompt"] or ("(your picture)" if job.get("source") == "upload" else "")
        print(f"{job['job_id']}  {job['created_at'][:19]}  {state:16} {title[:60]}")
    if page.get("next_cursor"):
        print(f"more: grok3d jobs --cursor {page['next_cursor']}", file=sys.stderr)
    return 0


def cmd_cancel(api: Api, args: argparse.Namespace) -> int:
    status = api.cancel(args.job_id)
    word = "cancelled" if status["status"] == "error" else "cancel requested; it stops shortly"
    print(f"job {status['job_id']} {word}")
    return 0


def cmd_delete(api: Api, args: argparse.Namespace) -> int:
    api.delete(args.job_id)
    print(f"job {args.job_id} deleted")
    return 0


def cmd_examples(api: Api, args: argparse.Namespace) -> int:
    examples = api.examples()
    if args.json:
        print(json.dumps({"examples": examples}, indent=2))
        return 0
    width = max((len(e["job_id"]) for e in examples), default=0)
    for example in examples:
        print(f"{example['job_id']:{width}}  {example['name']}: {example['description']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if hasattr(args, "run_local"):  # `grok3d keys ...`: the store, not the server
        return args.run_local(args)
    try:
        with Api(args.server, api_key=args.api_key) as api:
            return args.run(api, args)
    except CliError as exc:
        print(f"grok3d: {exc.message}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print("grok3d: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:  # the output folder cannot be written, the disk is full...
        print(f"grok3d: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        return EXIT_REFUSED
