"""``rayft cluster status``: the nodes of a Ray cluster, their CPUs/GPUs, and rayft's jobs.

With an ``http://`` address the dashboard's state API answers (carrying the auth token);
with any other address, or none (an embedded local cluster), Ray is initialised and asked
directly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from rayft.trainers.compat import is_head_node

STANDARD_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")


@dataclass
class NodeRow:
    """One node as ``rayft cluster status`` shows it."""

    node_id: str
    ip: str
    alive: bool
    is_head: bool
    cpus: float
    gpus: float
    custom: dict[str, float] = field(default_factory=dict)


def _custom(resources: dict[str, float]) -> dict[str, float]:
    # Ray adds one ``node:<ip>`` resource per node; it says nothing the IP column does not.
    return {
        k: v
        for k, v in resources.items()
        if k not in STANDARD_RESOURCES and not k.startswith("node:")
    }


def nodes_from_state(states: list[Any]) -> list[NodeRow]:
    """Rows from ``ray.util.state`` ``NodeState`` records."""
    rows = []
    for node in states:
        resources = dict(node.resources_total or {})
        rows.append(
            NodeRow(
                node_id=node.node_id,
                ip=node.node_ip,
                alive=node.state == "ALIVE",
                is_head=bool(node.is_head_node),
                cpus=resources.get("CPU", 0.0),
                gpus=resources.get("GPU", 0.0),
                custom=_custom(resources),
            )
        )
    return rows


def nodes_from_ray(nodes: list[dict[str, Any]]) -> list[NodeRow]:
    """Rows from ``ray.nodes()``."""
    rows = []
    for node in nodes:
        resources = dict(node.get("Resources") or {})
        rows.append(
            NodeRow(
                node_id=node["NodeID"],
                ip=node.get("NodeManagerAddress", "?"),
                alive=bool(node.get("Alive")),
                is_head=is_head_node(resources),
                cpus=resources.get("CPU", 0.0),
                gpus=resources.get("GPU", 0.0),
                custom=_custom(resources),
            )
        )
    return rows


def http_nodes(address: str, headers: dict[str, str]) -> list[NodeRow]:
    """Nodes through the dashboard's state API at ``address`` (``http://HEAD:8265``)."""
    from ray.util.state.api import StateApiClient
    from ray.util.state.common import ListApiOptions, StateResource

    client = StateApiClient(
        address=address, headers={"Content-Type": "application/json", **headers}
    )
    states = client.list(
        StateResource.NODES, options=ListApiOptions(detail=True), raise_on_missing_output=False
    )
    return nodes_from_state(states)


def format_status(nodes: list[NodeRow], jobs: list[Any] | None, where: str) -> str:
    """The text ``rayft cluster status`` prints."""
    alive = [n for n in nodes if n.alive]
    cpus = sum(n.cpus for n in alive)
    gpus = sum(n.gpus for n in alive)
    lines = [
        f"cluster   {where}",
        f"nodes     {len(alive)} alive ({len(nodes) - len(alive)} dead), "
        f"{cpus:g} CPUs, {gpus:g} GPUs",
        "",
    ]
    rows = [("NODE", "IP", "ROLE", "STATE", "CPUS", "GPUS", "RESOURCES")]
    for n in sorted(nodes, key=lambda n: (not n.is_head, n.node_id)):
        custom = ", ".join(f"{k}={v:g}" for k, v in sorted(n.custom.items())) or "-"
        rows.append(
            (
                n.node_id[:12],
                n.ip,
                "head" if n.is_head else "worker",
                "alive" if n.alive else "dead",
                f"{n.cpus:g}",
                f"{n.gpus:g}",
                custom,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines += [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows
    ]
    lines.append("")
    if jobs is None:
        lines.append("jobs      no Jobs API here (an embedded cluster); use --address to see jobs")
    else:
        running = [
            j for j in jobs if getattr(j.status, "value", str(j.status)) in ("PENDING", "RUNNING")
        ]
        lines.append(f"jobs      {len(running)} rayft job(s) running")
        for job in running:
            meta = job.metadata or {}
            lines.append(
                f"  {job.submission_id}  {meta.get('rayft_kind', '-')}  "
                f"{getattr(job.status, 'value', job.status)}  run "
                f"{meta.get('rayft_run_id', '-')}"
            )
    return "\n".join(lines)


def cluster_status(address: str | None, token_file: str | None = None) -> str:
    """Collect and format the status of the cluster at ``address`` (or an embedded one)."""
    import os

    from rayft.cluster.jobs import list_rayft_jobs
    from rayft.cluster.submit import auth_headers, jobs_client, resolve_token

    address = address or os.environ.get("RAY_ADDRESS")
    if address and address.startswith(("http://", "https://")):
        with jobs_client(address, token_file) as client:
            jobs = list_rayft_jobs(client)  # also proves the address and token work
            nodes = http_nodes(address, auth_headers(resolve_token(token_file)))
        return format_status(nodes, jobs, address)

    import ray

    from rayft.cluster.connect import connected

    with connected(address) as kind:
        nodes = nodes_from_ray(ray.nodes())
    jobs = None
    if kind != "embedded":
        try:
            with jobs_client(address, token_file) as client:
                jobs = list_rayft_jobs(client)
        except Exception:  # noqa: BLE001 - a cluster without a dashboard still has nodes
            jobs = None
    return format_status(nodes, jobs, address or "embedded local cluster")
