"""`grok3d generate | status | examples`: argparse in front of grok3d_cli.client; `grok3d keys ...` (grok3d_cli.keys)
works on the job store itself.

Exit codes: 0 done; 1 the server said no (bad prompt, unknown job, failed job, timeout waiting); 2 bad usage
(argparse); 3 no usable answer from the server (down, wrong address); 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from grok3d_cli.client import EXIT_REFUSED, Api, CliError
from grok3d_cli.keys import add_keys_command
from grok3d_cli.progress import ProgressBar

DEFAULT_SERVER = "http://localhost:8000"
POLL_S = 0.5
# (asset_type of API.md, file suffix): the order in which a job produces them.
ASSETS = (("image", "jpg"), ("glb", "glb"), ("usdz", "usdz"))


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

    generate = commands.add_parser("generate", parents=[common], help="make a 3D model from a prompt",
                                   description="Submit a prompt, follow the job, download its image, GLB and USDZ.")
    generate.add_argument("prompt", help="what to make, e.g. \"a red teapot\"")
    generate.add_argument("-o", "--output", type=Path, default=Path("."), metavar="DIR",
                          help="folder for <job_id>.jpg, .glb and .usdz (default: the current folder)")
    generate.add_argument("--timeout", type=float, default=3600.0, metavar="SECONDS",
                          help="give up waiting after this long; the job goes on (default: 3600)")
    generate.set_defaults(run=cmd_generate)

    status = commands.add_parser("status", parents=[common], help="show a job's status")
    status.add_argument("job_id")
    status.add_argument("--json", action="store_true", help="print the API's JSON as it is")
    status.set_defaults(run=cmd_status)

    examples = commands.add_parser("examples", parents=[common], help="list the example models")
    examples.add_argument("--json", action="store_true", help="print the API's JSON as it is")
    examples.set_defaults(run=cmd_examples)

    add_keys_command(commands)
    return parser


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
            raise CliError(f"job {job_id} is still {status['stage']} after {timeout_s:g} s; it goes on in the "
                           f"server: grok3d status {job_id}", EXIT_REFUSED)
        time.sleep(POLL_S)


def cmd_generate(api: Api, args: argparse.Namespace) -> int:
    job_id = api.generate(args.prompt)["job_id"]
    print(f"job {job_id} queued", file=sys.stderr)
    bar = ProgressBar()
    try:
        status = wait_for_job(api, job_id, args.timeout, bar)
    except KeyboardInterrupt:
        raise CliError(f"interrupted; job {job_id} goes on in the server: grok3d status {job_id}", 130) from None
    finally:
        bar.close()
    if status["status"] == "error":
        raise CliError(f"job {job_id} failed: {status.get('error') or 'no reason given'}", EXIT_REFUSED)
    for asset_type, suffix in ASSETS:
        target = args.output / f"{job_id}.{suffix}"
        api.download(job_id, asset_type, target)
        print(target)
    return 0


def cmd_status(api: Api, args: argparse.Namespace) -> int:
    status = api.status(args.job_id)
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    fields = ["job_id", "status", "stage", "progress", "prompt", "created_at", "model_version", "error"]
    for name in fields:
        if status.get(name) is not None:
            suffix = "%" if name == "progress" else ""
            print(f"{name + ':':15}{status[name]}{suffix}")
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
