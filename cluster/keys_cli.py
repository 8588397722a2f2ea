"""``rayft keys {create,list,revoke}``: API keys of projects, kept in the storage root.

A key belongs to one project and has one role: ``admin`` (every project), ``member``
(its project's files, jobs, adapters and evaluations) or ``inference`` (calls models
only). The key is printed once, by ``create``; the store (``auth/keys.json``) keeps only
a salted hash of it. Servers on the same storage root read the store on every change, so
a new or revoked key counts from the next request. See ``serving.auth``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from rayft.cluster.cli import add_storage
from rayft.cluster.errors import UserError

_STORAGE_HELP = "storage root the server uses (default $RAYFT_HOME)"


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``keys`` and its sub-commands to the ``rayft`` parser."""
    p = sub.add_parser(
        "keys",
        help="API keys of projects (admin, member, inference)",
        description="API keys for the rayft service: each belongs to a project and has a "
        "role. admin: every project; member: its project's files, jobs, adapters and "
        "evaluations; inference: calls models only. Clients send 'Authorization: Bearer "
        "<key>'. RAYFT_API_KEY stays one admin key of project 'default'.",
    )
    ksub = p.add_subparsers(dest="keys_cmd", required=True)
    pc = ksub.add_parser("create", help="make a key and print it (once: only its hash is kept)")
    pc.add_argument("--project", required=True, help="the project the key acts in")
    pc.add_argument(
        "--role", required=True, choices=("admin", "member", "inference"), help="what it may do"
    )
    pc.add_argument(
        "--expires",
        default=None,
        metavar="WHEN",
        help="when it stops working: 30d, 12h, 90m from now, or an ISO date/time "
        "(2027-01-31, 2027-01-31T12:00:00Z); default never",
    )
    pc.add_argument("--json", action="store_true", help="print the key and its record as JSON")
    add_storage(pc, _STORAGE_HELP)
    pl = ksub.add_parser("list", help="every key's id, project, role and times (never the key)")
    pl.add_argument("--project", default=None, help="only this project's keys")
    pl.add_argument("--json", action="store_true", help="print the records as JSON")
    add_storage(pl, _STORAGE_HELP)
    pr = ksub.add_parser("revoke", help="refuse a key from the next request on")
    pr.add_argument("key_id", help="the key's id (from `rayft keys list`) or the key itself")
    add_storage(pr, _STORAGE_HELP)
    p.set_defaults(func=cmd_keys)


def cmd_keys(args: argparse.Namespace) -> int:
    """Create, list or revoke keys in the storage root's key store."""
    from rayft.serving.auth import KeyStore, KeyStoreError, parse_expiry

    store = KeyStore(args.storage)
    try:
        if args.keys_cmd == "create":
            record, key = store.create(args.project, args.role, parse_expiry(args.expires))
            if args.json:
                print(json.dumps({"key": key, **record.public()}, indent=2))
            else:
                print(key)
                print(
                    f"key {record.id}: project {record.project}, role {record.role}, "
                    f"expires {_when(record.expires_at)}; store the key now, it is not shown "
                    "again",
                    file=sys.stderr,
                )
            return 0
        if args.keys_cmd == "revoke":
            record = store.revoke(args.key_id)
            print(f"revoked key {record.id} (project {record.project}, role {record.role})")
            return 0
    except KeyStoreError as err:
        raise UserError(str(err)) from None
    records = [r for r in store.records() if args.project in (None, r.project)]
    if args.json:
        print(json.dumps([r.public() for r in records], indent=2))
        return 0
    print(_table(records))
    return 0


def _when(ts: float | None) -> str:
    return "never" if ts is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _table(records: list[Any]) -> str:
    if not records:
        return "no keys (make one with: rayft keys create --project NAME --role member)"
    now = time.time()
    rows = [("ID", "PROJECT", "ROLE", "CREATED", "EXPIRES", "REVOKED", "STATE")]
    for r in records:
        state = "active" if r.active(now) else ("revoked" if r.revoked_at else "expired")
        revoked = _when(r.revoked_at) if r.revoked_at else "-"
        rows.append(
            (r.id, r.project, r.role, _when(r.created_at), _when(r.expires_at), revoked, state)
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    )
