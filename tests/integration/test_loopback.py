"""The embedded cluster and the served app listen on loopback only.

``rayft serve``'s path (``rayft.serve``: the embedded Ray cluster, Serve's proxy and the
replica) runs in a fresh interpreter whose environment lacks
``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER``, as a user's shell does; every TCP socket that
listens in its process tree (GCS, raylet, workers, agents, the metrics endpoint, the
proxy, the replica) must be bound to 127.0.0.1 or ::1.
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from processes import kill_tree

LISTENERS = """
import json, psutil
from rayft.cluster.api import serve, stop_serving
url = serve("tiny-llama", dtype="float32", show_progress=False)
me = psutil.Process()
found = []
for proc in [me, *me.children(recursive=True)]:
    try:
        conns = proc.net_connections(kind="tcp")
        name = proc.name()
    except psutil.Error:
        continue
    found += [[name, c.laddr.ip, c.laddr.port] for c in conns if c.status == psutil.CONN_LISTEN]
print("LISTENERS " + json.dumps({"url": url, "listeners": found}), flush=True)
stop_serving()
"""


def test_every_socket_of_the_embedded_cluster_and_the_app_is_on_loopback(
    rayft_home: Path, tiny_model_dir: Path
):
    unset = ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_ADDRESS", "RAYFT_BIND_ADDRESS")
    env = {k: v for k, v in os.environ.items() if k not in unset}
    env.update(RAYFT_HOME=str(rayft_home), RAY_DEDUP_LOGS="0", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.Popen(
        [sys.executable, "-c", LISTENERS],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=420)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        pytest.fail("the embedded cluster and the app did not start and stop within 420 s")
    lines = [line for line in out.splitlines() if line.startswith("LISTENERS ")]
    assert proc.returncode == 0 and lines, f"rc {proc.returncode}\n{out[-3000:]}\n{err[-3000:]}"
    report = json.loads(lines[-1].removeprefix("LISTENERS "))
    listeners = report["listeners"]
    port = int(report["url"].rsplit(":", 1)[1])
    assert port in {p for _, _, p in listeners}, report  # the proxy was seen
    assert len(listeners) >= 4, report  # GCS, raylet, agents, proxy at least
    # An IPv6 socket bound to ::ffff:127.0.0.1 (an IPv4-mapped address) is loopback too.
    exposed = [entry for entry in listeners if not _loopback(entry[1])]
    assert not exposed, f"listening beyond loopback: {exposed}"


def _loopback(address: str) -> bool:
    parsed = ipaddress.ip_address(address)
    mapped = getattr(parsed, "ipv4_mapped", None)
    return (mapped or parsed).is_loopback
