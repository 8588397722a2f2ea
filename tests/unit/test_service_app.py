"""The rayft service app: the inference app plus the control plane's routers, by import path."""

from __future__ import annotations

import ast
import asyncio
from pathlib import Path

import httpx
import pytest

from rayft.cluster.service_app import FINE_TUNING_ROUTES, ROUTERS, build_service_app
from rayft.serving.app import bind_app, build_app, import_router

SERVING = Path(__file__).resolve().parents[2] / "serving"


def test_the_service_builder_hands_the_fine_tuning_router_to_every_replica():
    service = build_service_app({"model": "tiny-llama"})._bound_deployment
    inference = build_app({"model": "tiny-llama"})._bound_deployment
    assert service.init_args[2] == ROUTERS == [FINE_TUNING_ROUTES]
    assert inference.init_args[2] == []
    # Same deployment otherwise: one set of serve arguments for both.
    assert service.init_args[0] == inference.init_args[0]


def test_a_router_path_is_checked_when_the_app_is_built():
    from fastapi import APIRouter

    assert isinstance(import_router(FINE_TUNING_ROUTES), APIRouter)
    with pytest.raises(ValueError, match="package.module:attribute"):
        bind_app({"model": "tiny-llama"}, routers=["rayft.cluster.fine_tuning_api"])
    with pytest.raises(ValueError, match="no_such_router"):
        bind_app({"model": "tiny-llama"}, routers=["rayft.cluster.fine_tuning_api:no_such_router"])
    with pytest.raises(ValueError, match="not a FastAPI APIRouter"):
        import_router("rayft.cluster.service_app:ROUTERS")


def test_the_fine_tuning_routes_answer_only_where_they_are_mounted(tiny_model_dir):
    from rayft.serving.engine import ModelEngine
    from rayft.serving.openai_api import create_api
    from rayft.serving.service import ModelService

    service = ModelService(ModelEngine("tiny-llama", dtype="float32"))

    async def get_all(routers: list) -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=create_api(service, routers))
        async with httpx.AsyncClient(transport=transport, base_url="http://rayft") as client:
            return [await client.get(p) for p in ("/health", "/v1/files", "/v1/fine_tuning/jobs")]

    try:
        without = asyncio.run(get_all([]))
        mounted = asyncio.run(get_all([import_router(p) for p in ROUTERS]))
    finally:
        service.close()
    assert [r.status_code for r in without] == [200, 404, 404]
    assert [r.status_code for r in mounted] == [200, 200, 200]
    assert mounted[1].json()["object"] == "list" and mounted[2].json()["object"] == "list"


def test_build_app_is_a_one_argument_builder_as_serve_run_needs():
    import inspect

    assert len(inspect.signature(build_app).parameters) == 1
    assert len(inspect.signature(build_service_app).parameters) == 1


def test_the_builders_refuse_an_unkeyed_open_interface(monkeypatch):
    from rayft.serving.client import InsecureServing

    monkeypatch.delenv("RAYFT_API_KEY", raising=False)
    # The interface Serve binds by default: Ray Serve's own environment variable.
    monkeypatch.setenv("RAY_SERVE_DEFAULT_HTTP_HOST", "0.0.0.0")
    for builder in (build_app, build_service_app):
        with pytest.raises(InsecureServing, match="0.0.0.0"):
            builder({"model": "tiny-llama"})
    with pytest.raises(InsecureServing, match="10.1.2.3"):
        bind_app({"model": "tiny-llama"}, http_host="10.1.2.3")
    monkeypatch.setenv("RAYFT_API_KEY", "sekret")
    served = build_app({"model": "tiny-llama"})._bound_deployment.init_args[0]
    assert served["allowed_hosts"]  # the machine's names, for the wildcard bind
    named = bind_app({"model": "tiny-llama", "allowed_hosts": ["a.example"]}, http_host="b.example")
    assert named._bound_deployment.init_args[0]["allowed_hosts"] == ["a.example", "b.example"]
    monkeypatch.delenv("RAYFT_API_KEY")
    monkeypatch.delenv("RAY_SERVE_DEFAULT_HTTP_HOST")
    assert build_app({"model": "tiny-llama"})._bound_deployment.init_args[0]["allowed_hosts"] == []


def test_serving_never_imports_the_control_plane_or_the_training_driver():
    offenders = []
    for path in sorted(SERVING.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            if any(n.startswith(("rayft.cluster", "rayft.trainers.driver")) for n in names):
                offenders.append(f"serving/{path.name}:{node.lineno}")
    assert not offenders, "serving imports the control plane or the driver: " + ", ".join(offenders)
