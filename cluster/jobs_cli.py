"""``rayft submit``, ``rayft jobs {list,status,logs,stop}`` and ``rayft cluster status``."""

from __future__ import annotations

import argparse
import json
import sys

from rayft.cluster.cli import add_address, add_overrides, add_storage
from rayft.cluster.console import LEVEL_ENV, is_verbose
from rayft.cluster.submit import DEFAULT_MAX_UPLOAD_MB


def cmd_submit(args: argparse.Namespace) -> int:
    """Submit through ``api.submit``; print the job id, then follow its log if asked."""
    from rayft.cluster.api import submit
    from rayft.cluster.jobs import exit_code_for
    from rayft.cluster.submit import jobs_address

    jobs_address(args.address)  # no address: fail before anything else
    handle = submit(
        args.config,
        address=args.address,
        overrides=args.overrides,
        token_file=args.token_file,
        storage=args.storage,
        kind=args.kind,
        code=args.code,
        resume=args.resume,
        env=_job_env(args.env),
        max_upload_mb=args.max_upload_mb,
        python=args.python,
    )
    print(
        f"rayft: submitted {handle.kind} job {handle.job_id} (run {handle.run_id}, "
        f"{handle.upload_bytes / 1024:.0f} KiB uploaded)",
        file=sys.stderr,
    )
    print(handle.job_id, flush=True)
    if not args.follow:
        print(f"rayft: watch it with: rayft jobs logs {handle.job_id} --follow", file=sys.stderr)
        return 0
    status = handle.follow(sys.stdout)
    message = handle.status().message if status != "SUCCEEDED" else None
    print(
        f"rayft: job {handle.job_id} {status.lower()}" + (f": {message}" if message else ""),
        file=sys.stderr,
    )
    return exit_code_for(status)


def _job_env(pairs: list[str]) -> dict[str, str]:
    from rayft.cluster.submit import parse_env

    env = parse_env(pairs)
    if is_verbose():  # `rayft submit --verbose`: the job's log carries Ray's worker logs too
        env.setdefault(LEVEL_ENV, "info")
    return env


def cmd_jobs(args: argparse.Namespace) -> int:
    from rayft.cluster.jobs import (
        exit_code_for,
        follow_logs,
        format_job_rows,
        format_view,
        job_status,
        list_rayft_jobs,
        stop_job,
    )
    from rayft.cluster.submit import jobs_client

    if args.jobs_cmd in ("status", "logs") and args.storage:
        return _run_from_storage(args)
    with jobs_client(args.address, args.token_file) as client:
        if args.jobs_cmd == "list":
            print(format_job_rows(list_rayft_jobs(client, everything=args.all)))
            return 0
        if args.jobs_cmd == "status":
            view = job_status(client, args.job_id)
            print(json.dumps(view.to_dict(), default=str) if args.json else format_view(view))
            return 0
        if args.jobs_cmd == "logs":
            if args.follow:
                return exit_code_for(follow_logs(client, args.job_id, sys.stdout))
            sys.stdout.write(client.get_job_logs(args.job_id))
            return 0
        if args.jobs_cmd == "stop":
            status = stop_job(client, args.job_id, wait_s=args.wait)
            print(f"job {args.job_id}: {status.lower()}")
            view = job_status(client, args.job_id)
            if view.run_id and view.state == "stopped":
                print(
                    f"its checkpoints stay in storage; continue it with: rayft submit CONFIG "
                    f"--resume {view.run_id} --address ..."
                )
            return 0
    raise AssertionError(args.jobs_cmd)  # argparse only lets the four through


def _run_from_storage(args: argparse.Namespace) -> int:
    """``status``/``logs`` of a run read from its storage (``rayft train`` runs have no job)."""
    from rayft.cluster.jobs import format_view, run_logs, run_view
    from rayft.trainers.storage import StorageRoot

    root = StorageRoot.resolve(args.storage)
    if args.jobs_cmd == "logs":
        print(run_logs(root, args.job_id))
        return 0
    view = run_view(root, args.job_id)
    print(json.dumps(view.to_dict(), default=str) if args.json else format_view(view))
    return 0


def cmd_cluster(args: argparse.Namespace) -> int:
    from rayft.cluster.status import cluster_status

    print(cluster_status(args.address, args.token_file))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``submit``, ``jobs`` and ``cluster`` to the ``rayft`` parser."""
    p = sub.add_parser(
        "submit",
        help="submit a train or tune job to a Ray cluster through the Jobs API",
        description="Ship the job spec, its local data files and (by default) rayft's code to "
        "a Ray cluster and run `rayft train|tune` there. Prints the job id.",
    )
    p.add_argument("config", help="YAML job spec")
    add_overrides(p)
    add_address(p, "jobs")
    add_storage(
        p,
        "shared directory or s3:// / gs:// URI for runs, checkpoints and "
        "adapters (overrides storage: in the spec)",
    )
    p.add_argument(
        "--kind",
        choices=("auto", "train", "tune"),
        default="auto",
        help="train or tune (auto: tune when the spec has a tune: section)",
    )
    p.add_argument(
        "--code",
        choices=("ship", "installed"),
        default="ship",
        help="ship rayft's code with the job (default) or use the rayft installed "
        "in the cluster's image",
    )
    p.add_argument(
        "--resume",
        metavar="RUN_ID",
        default=None,
        help="continue a stopped or failed run from its newest checkpoint",
    )
    p.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="environment variable for the job (repeatable)",
    )
    p.add_argument(
        "--max-upload-mb",
        type=float,
        default=DEFAULT_MAX_UPLOAD_MB,
        help="limit for local data files shipped with the job",
    )
    p.add_argument(
        "--python", default="python", help="Python executable on the cluster that runs the job"
    )
    p.add_argument("--follow", action="store_true", help="stream the job's log until it ends")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("jobs", help="list, inspect, follow and stop submitted jobs")
    jsub = p.add_subparsers(dest="jobs_cmd", required=True)
    pl = jsub.add_parser("list", help="rayft jobs on the cluster, newest first")
    pl.add_argument("--all", action="store_true", help="include jobs rayft did not submit")
    add_address(pl, "jobs")
    ps = jsub.add_parser("status", help="state, step, latest metrics and artifact of a job")
    ps.add_argument("job_id")
    ps.add_argument("--json", action="store_true", help="print the status as JSON")
    add_address(ps, "jobs")
    add_storage(ps, "read run JOB_ID (a run id) from this root instead of asking a cluster")
    pg = jsub.add_parser("logs", help="a job's log")
    pg.add_argument("job_id")
    pg.add_argument("--follow", action="store_true", help="stream until the job ends")
    add_address(pg, "jobs")
    add_storage(pg, "print run JOB_ID's events from this root instead of asking a cluster")
    pt = jsub.add_parser("stop", help="stop a job; its checkpoints stay for --resume")
    pt.add_argument("job_id")
    pt.add_argument("--wait", type=float, default=60.0, help="seconds to wait for it to stop")
    add_address(pt, "jobs")
    p.set_defaults(func=cmd_jobs)

    p = sub.add_parser("cluster", help="the Ray cluster: nodes, CPUs/GPUs, running jobs")
    csub = p.add_subparsers(dest="cluster_cmd", required=True)
    pc = csub.add_parser("status", help="nodes, CPUs/GPUs and running rayft jobs")
    add_address(pc, "any")
    p.set_defaults(func=cmd_cluster)
