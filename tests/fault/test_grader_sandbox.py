"""The python grader's sandbox: each limit is broken by a grader, and the call ends in time
with a score of 0 and the limit named; isolation from the file system and the network
holds where rayft runs as root (``trainers.grader_sandbox`` documents the rest)."""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid

import pytest

from rayft.trainers.grader_sandbox import SandboxLimits, run_python_grader
from rayft.trainers.graders import GradeContext, grade, parse_grader

pytestmark = pytest.mark.fault

LIMITS = SandboxLimits(cpu_s=1, wall_s=2.0, memory_bytes=256 << 20, file_bytes=1 << 20)
AS_ROOT = os.geteuid() == 0
SAMPLE = {"output_text": "Paris"}


def run(body: str, limits: SandboxLimits = LIMITS):
    source = "import os\n\ndef grade(sample, item):\n" + "".join(
        f"    {line}\n" for line in body.splitlines()
    )
    started = time.monotonic()
    result = run_python_grader(source, SAMPLE, {"answer": "Paris"}, limits)
    return result, time.monotonic() - started


def test_a_grader_scores_with_sample_and_item_and_an_empty_environment():
    result, _ = run("return float(sample['output_text'] == item['answer']) / 2 + len(os.environ)")
    assert (result.score, result.error) == (0.5, None)


def test_an_infinite_loop_is_stopped_by_the_cpu_limit():
    # A wall-clock limit well past the CPU limit: the shared machine may be slow to give
    # the loop its one CPU second.
    limits = SandboxLimits(cpu_s=1, wall_s=6.0)
    result, took = run("while True:\n    pass", limits)
    assert result.score is None and result.error == "cpu_limit", result
    assert took < limits.wall_s


def test_a_sleeping_grader_is_killed_at_the_wall_clock_limit():
    result, took = run("import time\ntime.sleep(60)")
    assert result.error == "timeout" and "wall-clock" in result.details
    assert LIMITS.wall_s <= took < LIMITS.wall_s + 1.5


def test_a_memory_bomb_hits_the_memory_limit():
    result, took = run("blocks = []\nwhile True:\n    blocks.append(bytearray(50 << 20))")
    assert result.error == "memory_limit" and took < LIMITS.wall_s


def test_a_fork_bomb_cannot_start_a_process():
    result, _ = run("while True:\n    os.fork()")
    assert result.error == "runtime_error" and "Resource temporarily unavailable" in result.details


def test_a_big_file_hits_the_file_size_limit():
    result, _ = run("with open('big', 'wb') as f:\n    f.write(b'x' * (8 << 20))\nreturn 1")
    assert result.error == "file_size_limit"


def test_printing_a_huge_result_is_the_output_limit_not_a_hang():
    small = SandboxLimits(cpu_s=1, wall_s=2.0, output_bytes=1024)
    result, took = run("os.write(3, b'x' * (1 << 20))\nreturn 1", small)
    assert result.error == "output_limit" and took < small.wall_s + 1


def test_a_source_over_the_size_limit_is_refused_unrun():
    result = run_python_grader("x = 1\n" * 100, SAMPLE, {}, SandboxLimits(source_chars=100))
    assert result.error == "source_limit"


@pytest.mark.parametrize(
    ("value", "error"),
    [("float('nan')", "bad_score"), ("'1'", "bad_score"), ("1e999", "bad_score")],
)
def test_a_score_that_is_not_a_finite_number_is_refused(value, error):
    result, _ = run(f"return {value}")
    assert result.score is None and result.error == error


@pytest.mark.skipif(not AS_ROOT, reason="isolation needs root (see trainers/grader_sandbox.py)")
def test_as_root_the_grader_cannot_read_secrets_or_the_hidden_storage_root(tmp_path):
    storage = tmp_path / "storage"
    storage.mkdir()
    (storage / "secret.txt").write_text("s3cret")
    storage.chmod(0o755)
    (storage / "secret.txt").chmod(0o644)  # readable by anyone, yet hidden
    hidden = SandboxLimits(
        cpu_s=1, wall_s=2.0, hidden_paths=(*SandboxLimits().hidden_paths, str(storage))
    )
    shadow, _ = run("return len(open('/etc/shadow').read())", hidden)
    assert shadow.error == "runtime_error" and "Permission denied" in shadow.details
    assert shadow.isolation == {"network": True, "mounts": True, "user": True}
    secret, _ = run(f"return len(open({str(storage / 'secret.txt')!r}).read())", hidden)
    assert secret.score is None and secret.error == "runtime_error", secret
    outside = f"/tmp/rayft-grader-escape-{uuid.uuid4().hex}"
    escaped, _ = run(f"open({outside!r}, 'w').write('x')\nreturn 1", hidden)
    assert escaped.error == "runtime_error" and not os.path.exists(outside)


@pytest.mark.skipif(not AS_ROOT, reason="a network namespace needs root here")
def test_as_root_the_grader_cannot_reach_a_listening_socket():
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    accepted = []
    thread = threading.Thread(target=lambda: accepted.append(server.accept()), daemon=True)
    thread.start()
    body = f"import socket\nsocket.socket().connect(('127.0.0.1', {port}))\nreturn 1"
    result, _ = run(body)
    server.close()
    assert result.error == "runtime_error" and "unreachable" in result.details.lower()
    assert not accepted


def test_a_grader_that_raises_is_an_error_naming_the_row_and_the_line():
    grader = parse_grader(
        {"type": "python", "name": "strict", "source": "def grade(s, i):\n    return i['x']\n"}
    )
    result = grade(grader, "Paris", {"y": 1}, GradeContext(sandbox=LIMITS, row=12))
    assert result.score == 0.0
    [issue] = result.errors
    assert issue.kind == "python_grader_runtime_error"
    assert "row 12" in issue.details and "KeyError: 'x'" in issue.details
    assert "line 2 in grade" in issue.details


def test_a_limit_broken_inside_grade_is_reported_as_a_server_error_type():
    grader = parse_grader(
        {"type": "python", "name": "slow", "source": "def grade(s, i):\n    while 1: pass\n"}
    )
    result = grade(grader, "x", {}, GradeContext(sandbox=LIMITS))
    flags = result.metadata_errors()
    assert result.score == 0.0
    assert flags["python_grader_server_error"] and flags["python_grader_server_error_type"] in (
        "cpu_limit",
        "timeout",
    )
