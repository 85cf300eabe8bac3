"""`grok3d keys create | list | revoke`: API keys, managed on the job store itself (not through the server).

The store is the one the server's own settings name (pipeline.settings, `Settings.store_url`): GROK3D_DATABASE_URL
when it is set, else the SQLite file $GROK3D_DATA_DIR/grok3d.db. A key made here holds at once for every server on
that store; with several replicas the command must run with the replicas' GROK3D_DATABASE_URL. Scripts rely on the
output's form: `create` prints the new key alone on its last line of standard output (and nothing else there), its
words go to standard error.
"""

from __future__ import annotations

import argparse
import sys

EXIT_REFUSED = 1


def add_keys_command(commands: argparse._SubParsersAction) -> None:
    keys = commands.add_parser("keys", help="manage API keys (on the job store itself, no server needed)",
                               description="Create, list and revoke API keys in the job store itself (no server "
                                           "needs to run): the one GROK3D_DATABASE_URL names when it is set, else "
                                           "the SQLite file $GROK3D_DATA_DIR/grok3d.db (default ./data/grok3d.db). "
                                           "With several replicas, run it with the replicas' GROK3D_DATABASE_URL, "
                                           "or inside a replica's container (python -m grok3d_cli keys ...).")
    actions = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    create = actions.add_parser("create", help="make a key; it is printed once, on the last line")
    create.add_argument("--name", required=True, help="who or what the key is for; unique")
    create.add_argument("--rpm", type=int, metavar="N", help="requests per minute, status polls included")
    create.add_argument("--max-in-flight", type=int, metavar="N", help="jobs queued or processing at once")
    create.add_argument("--jobs-per-day", type=int, metavar="N", help="jobs per UTC day (one job = one paid image)")
    create.set_defaults(run_local=cmd_create)
    listing = actions.add_parser("list", help="list the keys (never the keys themselves)")
    listing.set_defaults(run_local=cmd_list)
    revoke = actions.add_parser("revoke", help="revoke a key: its next request is refused")
    revoke.add_argument("name")
    revoke.set_defaults(run_local=cmd_revoke)


def _open():
    """The key store on the configured job store (imported here: the HTTP sub-commands need none of it)."""
    from pipeline.jobs import JobStore
    from pipeline.keys import KeyStore
    from pipeline.settings import get_settings

    settings = get_settings()
    return KeyStore(JobStore(settings.store_url, lease_s=settings.lease_s))


def _run(action, args: argparse.Namespace) -> int:
    from pipeline.keys import KeyStoreError

    keys = _open()
    try:
        return action(keys, args)
    except KeyStoreError as exc:
        print(f"grok3d: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    finally:
        keys.store.close()


def cmd_create(args: argparse.Namespace) -> int:
    def create(keys, args: argparse.Namespace) -> int:
        given = {"rpm": args.rpm, "max_in_flight": args.max_in_flight, "jobs_per_day": args.jobs_per_day}
        row, key = keys.create(args.name, **{name: value for name, value in given.items() if value is not None})
        print(f"created key {row.name!r}: {row.rpm} requests per minute, {row.max_in_flight} jobs in flight, "
              f"{row.jobs_per_day} jobs per day", file=sys.stderr)
        print("it is shown this once (the store keeps only its SHA-256); send it as "
              "'Authorization: Bearer <key>'", file=sys.stderr)
        print(key, flush=True)
        return 0

    return _run(create, args)


def cmd_list(args: argparse.Namespace) -> int:
    def listing(keys, _args: argparse.Namespace) -> int:
        rows = keys.list()
        header = ("NAME", "STATUS", "RPM", "IN FLIGHT", "JOBS/DAY", "CREATED (UTC)")
        table = [header] + [(k.name, "active" if k.active else f"revoked {k.revoked_at[:19]}", str(k.rpm),
                             str(k.max_in_flight), str(k.jobs_per_day), k.created_at[:19]) for k in rows]
        widths = [max(len(row[i]) for row in table) for i in range(len(header))]
        for row in table:
            print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
        return 0

    return _run(listing, args)


def cmd_revoke(args: argparse.Namespace) -> int:
    def revoke(keys, args: argparse.Namespace) -> int:
        row = keys.revoke(args.name)
        print(f"key {row.name!r} revoked at {row.revoked_at[:19]} UTC: its next request is refused")
        return 0

    return _run(revoke, args)
