"""``rayft submit``, ``rayft jobs {list,status,logs,stop}`` and ``rayft cluster status``."""

from __future__ import annotations

import argparse
import json
import shutil
import sys

from rayft.cluster.submit import DEFAULT_MAX_UPLOAD_MB


def _add_connection(parser: argparse.ArgumentParser, jobs_api: bool = True) -> None:
    what = "the Ray Jobs API, http://HEAD:8265" if jobs_api else "a Ray cluster"
    parser.add_argument(
        "--address",
        default=None,
        help=f"address of {what} (default: $RAY_ADDRESS)",
    )
    parser.add_argument(
        "--token-file",
        default=None,
        metavar="PATH",
        help="file holding the cluster's auth token (default: $RAY_AUTH_TOKEN, "
        "$RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token)",
    )


def cmd_submit(args: argparse.Namespace) -> int:
    from rayft.cluster.jobs import exit_code_for, follow_logs
    from rayft.cluster.submit import (
        build_package,
        jobs_address,
        jobs_client,
        load_submit_spec,
        parse_env,
        submit_package,
    )

    jobs_address(args.address)  # no address: fail before staging anything
    spec = load_submit_spec(args.config, args.overrides)
    package = build_package(
        spec,
        storage=args.storage,
        kind=args.kind,
        code=args.code,
        resume=args.resume,
        env=parse_env(args.env),
        max_upload_mb=args.max_upload_mb,
        python=args.python,
    )
    try:
        with jobs_client(args.address, args.token_file) as client:
            job_id = submit_package(client, package)
            print(
                f"rayft: submitted {package.kind} job {job_id} (run {package.run_id}, "
                f"{package.upload_bytes / 1024:.0f} KiB uploaded)",
                file=sys.stderr,
            )
            print(job_id, flush=True)
            if not args.follow:
                print(f"rayft: watch it with: rayft jobs logs {job_id} --follow", file=sys.stderr)
                return 0
            status = follow_logs(client, job_id, sys.stdout)
            message = client.get_job_info(job_id).message if status != "SUCCEEDED" else None
    finally:
        shutil.rmtree(package.workdir, ignore_errors=True)
    print(
        f"rayft: job {job_id} {status.lower()}" + (f": {message}" if message else ""),
        file=sys.stderr,
    )
    return exit_code_for(status)


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
    p.add_argument("overrides", nargs="*", help="dotted.key=value")
    _add_connection(p)
    p.add_argument(
        "--storage",
        default=None,
        help="shared directory or s3:// / gs:// URI for runs, checkpoints and "
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
    _add_connection(pl)
    ps = jsub.add_parser("status", help="state, step, latest metrics and artifact of a job")
    ps.add_argument("job_id")
    ps.add_argument("--json", action="store_true", help="print the status as JSON")
    _add_connection(ps)
    pg = jsub.add_parser("logs", help="a job's log")
    pg.add_argument("job_id")
    pg.add_argument("--follow", action="store_true", help="stream until the job ends")
    _add_connection(pg)
    pt = jsub.add_parser("stop", help="stop a job; its checkpoints stay for --resume")
    pt.add_argument("job_id")
    pt.add_argument("--wait", type=float, default=60.0, help="seconds to wait for it to stop")
    _add_connection(pt)
    p.set_defaults(func=cmd_jobs)

    p = sub.add_parser("cluster", help="the Ray cluster: nodes, CPUs/GPUs, running jobs")
    csub = p.add_subparsers(dest="cluster_cmd", required=True)
    pc = csub.add_parser("status", help="nodes, CPUs/GPUs and running rayft jobs")
    pc.add_argument(
        "--address",
        default=None,
        help="http://HEAD:8265, a Ray address, or none for an embedded local cluster "
        "(default: $RAY_ADDRESS)",
    )
    pc.add_argument(
        "--token-file", default=None, metavar="PATH", help="file holding the cluster's auth token"
    )
    p.set_defaults(func=cmd_cluster)
