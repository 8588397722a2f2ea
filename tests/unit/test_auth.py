"""The key store and the auth decision (``serving.auth``): salted hashes only, revocation
and expiry from the next check, the roles' allow-list, and ``rayft keys``."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest

from rayft.serving.auth import (
    ENV_ADMIN,
    OPEN,
    Authenticator,
    KeyStore,
    KeyStoreError,
    Principal,
    bearer_token,
    parse_expiry,
    permits,
)
from rayft.trainers.storage import keys_relpath


def store_file(root: Path) -> Path:
    return root / keys_relpath()


def test_a_created_key_verifies_and_only_its_salted_hash_is_stored(tmp_path):
    store = KeyStore(str(tmp_path))
    record, key = store.create("alpha", "member")
    other, other_key = store.create("alpha", "member")
    prefix, key_id, secret = key.split("-", 2)
    assert (prefix, key_id) == ("rk", record.id) and len(secret) >= 40
    assert store.verify(key.encode()) == Principal(record.id, "alpha", "member")

    raw = store_file(tmp_path).read_text()
    assert secret not in raw and key not in raw and other_key.split("-", 2)[2] not in raw
    saved = {k["id"]: k for k in json.loads(raw)["keys"]}
    assert set(saved) == {record.id, other.id}
    stored = saved[record.id]
    salt = bytes.fromhex(stored["salt"])
    assert stored["sha256"] == hashlib.sha256(salt + secret.encode()).hexdigest()
    assert stored["sha256"] != hashlib.sha256(secret.encode()).hexdigest()
    assert stored["salt"] != saved[other.id]["salt"]  # a salt per key
    assert store_file(tmp_path).stat().st_mode & 0o077 == 0  # not readable by others


@pytest.mark.parametrize(
    "token",
    [
        b"",
        b"rk",
        b"rk--",
        b"rk-deadbeefdeadbeef-nosuchsecret",
        "rk-\u00e9\u00e9-x".encode(),
        b"\xff\xfe",
    ],
)
def test_malformed_and_unknown_tokens_are_refused(tmp_path, token):
    store = KeyStore(str(tmp_path))
    store.create("alpha", "member")
    assert store.verify(token) is None


def test_a_wrong_secret_for_a_known_id_is_refused(tmp_path):
    store = KeyStore(str(tmp_path))
    record, key = store.create("alpha", "admin")
    assert store.verify(key[:-1].encode() + (b"A" if key[-1] != "A" else b"B")) is None
    assert store.verify(f"rk-{record.id}-".encode()) is None


def test_revoking_counts_at_the_next_check_of_a_replica_that_already_read_the_store(tmp_path):
    replica = KeyStore(str(tmp_path))
    cli = KeyStore(str(tmp_path))
    record, key = cli.create("alpha", "member")
    assert replica.verify(key.encode()) is not None
    revoked = cli.revoke(record.id)
    assert revoked.revoked_at is not None
    assert replica.verify(key.encode()) is None
    assert cli.revoke(key).revoked_at == revoked.revoked_at  # by the key itself, unchanged
    with pytest.raises(KeyStoreError, match="no key"):
        cli.revoke("0123456789abcdef")
    listed = {r.id: r for r in replica.records()}
    assert not listed[record.id].active(time.time())


def test_an_expired_key_is_refused(tmp_path):
    store = KeyStore(str(tmp_path))
    now = time.time()
    _, key = store.create("alpha", "member", expires_at=now + 60)
    assert store.verify(key.encode(), now=now + 59) is not None
    assert store.verify(key.encode(), now=now + 60) is None
    _, old = store.create("alpha", "member", expires_at=now - 1)
    assert store.verify(old.encode()) is None


def test_expiry_is_a_duration_or_an_iso_time_in_the_future():
    now = 1_800_000_000.0
    assert parse_expiry(None, now) is None
    assert parse_expiry("30d", now) == now + 30 * 86400
    assert parse_expiry("12h", now) == now + 12 * 3600
    assert parse_expiry("90m", now) == now + 90 * 60
    assert parse_expiry("2030-01-31", now) == 1_896_048_000.0
    assert parse_expiry("2030-01-31T12:00:00Z", now) == 1_896_048_000.0 + 43200
    for bad in ("0d", "2020-01-01", "soon", "30 days", "-5d", "2030-13-01"):
        with pytest.raises(KeyStoreError, match="--expires"):
            parse_expiry(bad, now)


def test_projects_and_roles_are_checked(tmp_path):
    store = KeyStore(str(tmp_path))
    for project in ("", "Alpha", "a b", "../x", "x" * 65, "-a"):
        with pytest.raises(KeyStoreError, match="project"):
            store.create(project, "member")
    with pytest.raises(KeyStoreError, match="role"):
        store.create("alpha", "owner")
    assert not store_file(tmp_path).exists()


def test_the_environment_key_is_an_admin_and_no_key_anywhere_is_open(tmp_path):
    digest = hashlib.sha256(b"env-secret").digest()
    open_server = Authenticator(None, KeyStore(str(tmp_path / "empty")))
    assert not open_server.requires_key and open_server.principal(None) == OPEN
    keyed = Authenticator(digest, KeyStore(str(tmp_path)))
    assert keyed.principal(b"env-secret") == ENV_ADMIN
    assert ENV_ADMIN.project == "default" and ENV_ADMIN.is_admin
    assert keyed.principal(None) is None and keyed.principal(b"env-secreT") is None


def test_a_store_of_only_revoked_keys_still_needs_a_key(tmp_path):
    store = KeyStore(str(tmp_path))
    record, key = store.create("alpha", "member")
    store.revoke(record.id)
    auth = Authenticator(None, KeyStore(str(tmp_path)))
    assert auth.requires_key
    assert auth.principal(None) is None and auth.principal(key.encode()) is None


def test_an_unreadable_store_accepts_no_key(tmp_path):
    store = KeyStore(str(tmp_path))
    _, key = store.create("alpha", "admin")
    store_file(tmp_path).write_text("{not json")
    auth = Authenticator(None, KeyStore(str(tmp_path)))
    assert auth.requires_key and auth.principal(key.encode()) is None
    with pytest.raises(KeyStoreError, match="unreadable"):
        store.create("alpha", "member")  # never overwrites what it cannot read


def test_inference_keys_may_only_call_models():
    inference = Principal("k", "alpha", "inference")
    member = Principal("m", "alpha", "member")
    allowed = [
        ("GET", "/v1/models"),
        ("GET", "/v1/models/ft:tiny:x"),
        ("POST", "/v1/completions"),
        ("POST", "/v1/chat/completions/"),
        ("POST", "/v1/embeddings"),
        ("POST", "/v1/classifications"),
    ]
    refused = [
        ("POST", "/v1/files"),
        ("GET", "/v1/files"),
        ("DELETE", "/v1/files/file-1"),
        ("POST", "/v1/fine_tuning/jobs"),
        ("POST", "/v1/fine_tuning/jobs/ftjob-1/cancel"),
        ("POST", "/v1/evaluations"),
        ("POST", "/v1/models"),
        ("GET", "/v1/evals"),
    ]
    assert all(permits(inference, m, p) for m, p in allowed)
    assert not any(permits(inference, m, p) for m, p in refused)
    assert all(permits(member, m, p) for m, p in refused)


def test_visibility_by_project():
    member = Principal("m", "alpha", "member")
    admin = Principal("a", "ops", "admin")
    assert member.sees(None) and member.sees("alpha") and not member.sees("beta")
    assert admin.sees("beta") and admin.scope is None and member.scope == "alpha"
    legacy = Principal("d", "default", "member")
    assert legacy.owns(None) and not member.owns(None)  # records before projects: default


def test_bearer_tokens_are_taken_from_the_header_as_sent():
    assert bearer_token(b"Bearer rk-1-abc") == b"rk-1-abc"
    assert bearer_token(b"bearer  rk-1-abc ") == b"rk-1-abc"
    for value in (b"", b"Bearer", b"Bearer ", b"Basic abc", b"rk-1-abc"):
        assert bearer_token(value) is None


def test_keys_cli_prints_the_key_once_and_lists_no_secret(tmp_path, capsys):
    from rayft.cluster.cli import main

    root = str(tmp_path)
    assert main(["keys", "create", "--project", "alpha", "--role", "inference",
                 "--expires", "30d", "--storage", root]) == 0  # fmt: skip
    key = capsys.readouterr().out.strip()
    principal = KeyStore(root).verify(key.encode())
    assert principal is not None and principal.role == "inference"
    assert main(["keys", "list", "--storage", root, "--json"]) == 0
    listed = capsys.readouterr().out
    assert key.split("-", 2)[2] not in listed and "sha256" not in listed
    [entry] = json.loads(listed)
    assert entry["id"] == principal.key_id and entry["expires_at"] > time.time() + 29 * 86400
    assert main(["keys", "revoke", principal.key_id, "--storage", root]) == 0
    assert KeyStore(root).verify(key.encode()) is None
    assert main(["keys", "list", "--storage", root]) == 0
    assert "revoked" in capsys.readouterr().out
    assert main(["keys", "create", "--project", "Alpha", "--role", "member",
                 "--storage", root]) == 2  # fmt: skip


def test_under_an_object_storage_root_replicas_reread_the_store_within_the_refresh_bound(
    tmp_path, monkeypatch
):
    from harness import s3_server

    monkeypatch.setenv("RAYFT_CACHE", str(tmp_path / "cache"))
    with s3_server("keys"):
        uri = "s3://keys/rayft"
        cli = KeyStore(uri)
        record, key = cli.create("alpha", "member")
        replica = KeyStore(uri, refresh_s=0.3)
        assert replica.verify(key.encode()) == Principal(record.id, "alpha", "member")
        cli.revoke(record.id)
        time.sleep(0.35)
        assert replica.verify(key.encode()) is None
        assert Authenticator(None, KeyStore(uri)).requires_key
