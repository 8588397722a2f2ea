"""OpenAI's files and fine-tuning jobs routes, mounted on the same app as inference.

The rayft service (``cluster.service_app``) passes this ``router`` to ``serving.app.build_app``.

    POST   /v1/files                              multipart ``file`` + ``purpose=fine-tune``
    GET    /v1/files                              newest first (``purpose``, ``after``, ``limit``)
    GET    /v1/files/{file_id}
    GET    /v1/files/{file_id}/content
    DELETE /v1/files/{file_id}
    POST   /v1/fine_tuning/jobs                   OpenAI's body + the ``rayft`` extension
    GET    /v1/fine_tuning/jobs                   newest first (``after``, ``limit``)
    GET    /v1/fine_tuning/jobs/{job_id}
    POST   /v1/fine_tuning/jobs/{job_id}/cancel
    POST   /v1/fine_tuning/jobs/{job_id}/pause    checkpoint at the next step and stop
    POST   /v1/fine_tuning/jobs/{job_id}/resume   continue a paused job from its checkpoint
    GET    /v1/fine_tuning/jobs/{job_id}/events   newest first (``after``, ``limit``)
    GET    /v1/fine_tuning/jobs/{job_id}/checkpoints
    POST   /v1/fine_tuning/alpha/graders/run      OpenAI's graders (``cluster.graders_api``)
    POST   /v1/fine_tuning/alpha/graders/validate
    ...    /v1/evals/...                          OpenAI's evals API (``cluster.evals_api``)

A key sees and changes only its project's files and jobs (``serving.auth``): another
project's id answers 404 as an unknown one does, lists leave them out, an admin key sees
every project's, and an ``inference`` key gets 403 on every route here.

The app's ``RequestGuard`` checks the API key and the body size first (uploads have their
own limit, ``max_file_bytes``); errors have the inference routes' shape. Handlers that
touch storage or Ray are plain functions, which FastAPI runs off the event loop, so a
slow storage root never stalls decoding.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse

from rayft.cluster import fine_tuning as jobs
from rayft.cluster import job_body, job_queue
from rayft.cluster.evals_api import router as evals_router
from rayft.cluster.files_service import FileStore, check_purpose, id_page, limit_param
from rayft.cluster.graders_api import router as graders_router
from rayft.cluster.quotas import CheckpointSweeper, FileUsage, check_file_quota, check_job_quota
from rayft.cluster.uploads import UploadSlots, receive_upload
from rayft.serving.errors import BadRequest
from rayft.serving.openai_api import get_principal
from rayft.serving.service import ModelService
from rayft.trainers.config import JobSpec, set_dotted
from rayft.trainers.job_limits import JobLimits, cluster_size, limit_problems

router = APIRouter()
router.include_router(graders_router)  # /v1/fine_tuning/alpha/graders/run, /validate
router.include_router(evals_router)  # /v1/evals, its runs and output items


def _service(request: Request) -> ModelService:
    return request.app.state.service


def _files(request: Request) -> FileStore:
    """The uploaded files the request's key may see and change (its project's)."""
    service = _service(request)
    return FileStore(service.engine.storage, service.limits.max_file_bytes, get_principal(request))


def _replica_state(request: Request, name: str, make: Any) -> Any:
    """``request.app.state.<name>``, made with ``make(service)`` on first use (per replica)."""
    value = getattr(request.app.state, name, None)
    if value is None:
        value = make(_service(request))
        setattr(request.app.state, name, value)
    return value


def _file_usage(request: Request) -> FileUsage:
    """The replica's count of each project's stored files (``project_quotas``)."""
    return _replica_state(request, "file_usage", lambda s: FileUsage(s.engine.storage))


def _sweeper(request: Request) -> CheckpointSweeper:
    """The replica's remover of finished jobs' checkpoints (``checkpoint_retention_hours``)."""
    return _replica_state(
        request,
        "checkpoint_sweeper",
        lambda s: CheckpointSweeper(s.limits.project_quotas.checkpoint_retention_hours),
    )


def _job(request: Request, job_id: str) -> dict[str, Any]:
    """The record of ``job_id`` if the request's key may see it, else 404 as for no job."""
    root = _service(request).engine.storage
    return jobs.read_job(root, job_id, get_principal(request).scope)


def _limit(request: Request, default: int) -> int:
    return limit_param(request.query_params.get("limit"), default)


# --------------------------------------------------------------------- files


@router.post("/v1/files")
async def create_file(request: Request) -> dict[str, Any]:
    """Store an uploaded training file after checking every row as ``rayft train`` would.

    The body is streamed to disk as it arrives (``cluster.uploads``), never held whole.
    A project at its ``max_files`` or ``max_file_bytes_total`` quota is refused before the
    body is read; one that the received file would put past it, once it is received.
    """
    store = _files(request)
    quotas, usage = _service(request).limits.project_quotas, _file_usage(request)
    check_file_quota(await run_in_threadpool(usage.of, store.project), quotas, store.project)
    with _upload_slots(request).taken():
        upload = await receive_upload(
            request.headers.get("content-type", ""), request.stream(), store
        )
        try:
            if upload.staging is None:
                raise BadRequest("send the file as the multipart form field 'file'", param="file")
            check_purpose(upload.purpose)
            used = await run_in_threadpool(usage.of, store.project)
            check_file_quota(used, quotas, store.project, adding=upload.size)
            return await run_in_threadpool(
                store.accept,
                upload.file_id,
                upload.filename,
                upload.suffix,
                upload.staging,
                upload.size,
                upload.purpose,
            )
        finally:
            if upload.staging is not None:
                upload.staging.unlink(missing_ok=True)


def _upload_slots(request: Request) -> UploadSlots:
    """The replica's upload slots (``max_concurrent_uploads``), made on first use."""
    slots = getattr(request.app.state, "upload_slots", None)
    if slots is None:
        slots = UploadSlots(_service(request).limits.max_concurrent_uploads)
        request.app.state.upload_slots = slots
    return slots


@router.get("/v1/files")
def list_files(request: Request) -> dict[str, Any]:
    """Uploaded files, newest first (``order=asc`` for oldest first)."""
    params = request.query_params
    items = _files(request).list(params.get("purpose"))
    if params.get("order") == "asc":
        items = items[::-1]
    return id_page(items, params.get("after"), _limit(request, 10000))


@router.get("/v1/files/{file_id}")
def retrieve_file(file_id: str, request: Request) -> dict[str, Any]:
    return _files(request).get(file_id)


@router.get("/v1/files/{file_id}/content")
def file_content(file_id: str, request: Request) -> FileResponse:
    store = _files(request)
    record = store.get(file_id)
    return FileResponse(
        store.content(file_id), media_type="application/octet-stream", filename=record["filename"]
    )


@router.delete("/v1/files/{file_id}")
def delete_file(file_id: str, request: Request) -> dict[str, Any]:
    return _files(request).delete(file_id)


# ---------------------------------------------------------------------- jobs


@router.post("/v1/fine_tuning/jobs")
async def create_job(request: Request) -> dict[str, Any]:
    """Check the body, the files and the job spec, record the job and start its runner."""
    body = job_body.load_json(await request.body())  # numbers bounded, keys named
    job = jobs.parse_request(body)
    service, store = _service(request), _files(request)
    return await run_in_threadpool(start_job, service, store, job, _sweeper(request))


def start_job(
    service: ModelService,
    store: FileStore,
    job: jobs.JobRequest,
    sweeper: CheckpointSweeper | None = None,
) -> dict[str, Any]:
    """Record a new job (``validating_files``) and start its runner on the Ray cluster.

    Args:
        sweeper: Removes finished jobs' checkpoints past retention, a few per new job.

    Raises:
        QuotaExceeded: The project has ``max_active_jobs`` jobs that have not ended.
        BadRequest / NotFound / Conflict: The model is not this server's base model or a
            published adapter of it, a file is unknown, or the job spec is invalid.
    """
    from rayft.serving.engine import BASE_ADAPTER

    records = jobs.list_jobs(store.root)
    if sweeper is not None:
        sweeper.sweep(store.root, records)
    quotas = service.limits.project_quotas
    check_job_quota(store.root, records, quotas, store.project, _refresh_if_connected)

    shared = jobs.take_shared(job)  # a job option, not a spec key
    adapter = service.adapter_for(job.model, store.principal)  # another project's: 404
    parent = None if adapter == BASE_ADAPTER else adapter
    labels: dict[str, str] = {}
    urls: dict[str, str | None] = {}
    for field in ("training_file", "validation_file"):
        file_id = getattr(job, field)
        if file_id is None:
            urls[field] = None
            continue
        urls[field] = _file_url(store, file_id, field)
        labels[urls[field]] = f"{field} {file_id} ({store.get(file_id)['filename']})"
    references = {}
    for key, file_id in job_body.file_references(job.rayft).items():
        references[key] = _file_url(store, file_id, f"rayft.{key}")
        labels[references[key]] = f"rayft.{key} {file_id} ({store.get(file_id)['filename']})"
    job_id = jobs.new_job_id()
    output = jobs.fine_tuned_name(service.model_name, job.suffix, job_id)
    spec, hyperparameters = jobs.build_spec(
        job,
        base_model=service.model_name,
        parent_adapter=parent,
        train_url=urls["training_file"] or "",
        eval_url=urls["validation_file"],
        storage=store.root.location,
        output_name=output,
    )
    for key, url in references.items():
        spec = set_dotted(spec, key, url)
    validated = jobs.validate_job_spec(spec, job)
    _check_limits(validated, service.limits.job_limits, job)
    checked = validated.to_dict()  # every key, defaults filled in
    key_id = store.principal.key_id if store.principal is not None else None
    record = jobs.new_record(job_id, job, checked, hyperparameters, labels, store.project, key_id)
    record["rayft"]["shared"] = shared
    jobs.save_job(store.root, record)
    record = jobs.enqueue(store.root, job_id, jobs.runner_env())  # starts it if it fits
    if job_queue.is_waiting(record):
        record = jobs.with_queue_positions(jobs.list_jobs(store.root), record)
    return jobs.job_object(record)


def _refresh_if_connected(root: Any, record: dict[str, Any]) -> dict[str, Any]:
    """``jobs.refresh`` when this process is connected to Ray (it looks up the runner)."""
    import ray

    return jobs.refresh(root, record) if ray.is_initialized() else record


def _check_limits(spec: JobSpec, limits: JobLimits, job: jobs.JobRequest) -> None:
    """Refuse a job past the server's ``job_limits`` or the cluster's size (400 naming it)."""
    problems = limit_problems(spec, limits, cluster_size())
    if problems:
        params = [jobs.body_param(key, job) for key, _ in problems]
        message = "; ".join(f"{p}: {m}" for p, (_, m) in zip(params, problems, strict=True))
        raise BadRequest(message, code="job_limit_exceeded", param=params[0])


def _file_url(store: FileStore, file_id: str, field: str) -> str:
    from rayft.serving.errors import NotFound

    try:
        record = store.get(file_id)
    except NotFound:
        raise BadRequest(
            f"{field} {file_id!r} is not an uploaded file; upload it with POST /v1/files "
            "(purpose fine-tune) and pass the returned id",
            code=f"invalid_{field}",
            param=field,
        ) from None
    if record.get("purpose") != "fine-tune":
        raise BadRequest(f"{field} {file_id!r} is not a fine-tune file", param=field)
    return store.url(file_id)


@router.get("/v1/fine_tuning/jobs")
def list_jobs(request: Request) -> dict[str, Any]:
    """The key's project's jobs (an admin's: every job), newest first; ``after`` is the id of
    the last job of the previous page."""
    root = _service(request).engine.storage
    principal = get_principal(request)
    _admit_if_connected(root)
    every = jobs.list_jobs(root)
    _sweeper(request).sweep(root, every)
    owned = [r for r in every if principal.owns(jobs.job_project(r))]
    records = jobs.with_queue_positions([jobs.refresh(root, r) for r in owned])
    items = [jobs.job_object(r) for r in records]
    return jobs.listing(items, request.query_params.get("after"), _limit(request, 20))


@router.get("/v1/fine_tuning/jobs/{job_id}")
def retrieve_job(job_id: str, request: Request) -> dict[str, Any]:
    root = _service(request).engine.storage
    _admit_if_connected(root)
    record = jobs.refresh(root, _job(request, job_id))
    if job_queue.is_waiting(record):  # its place is counted over every job
        record = jobs.with_queue_positions(jobs.list_jobs(root), record)
    return jobs.job_object(record)


def _admit_if_connected(root: Any) -> None:
    """Start waiting jobs that fit now (the queue moves as it is looked at)."""
    import ray

    if ray.is_initialized():
        jobs.admit_waiting(root, jobs.runner_env())


@router.post("/v1/fine_tuning/jobs/{job_id}/cancel")
def cancel_job(job_id: str, request: Request) -> dict[str, Any]:
    """Stop the job's Ray work; a cancelled job publishes nothing."""
    _job(request, job_id)  # another project's job is not found
    root = _service(request).engine.storage
    return jobs.job_object(jobs.cancel(root, job_id, get_principal(request).key_id))


@router.post("/v1/fine_tuning/jobs/{job_id}/pause")
def pause_job(job_id: str, request: Request) -> dict[str, Any]:
    """Checkpoint the job's run at its next step and stop it (``paused``); nothing is
    published. Waits up to ``job_limits.pause_wait_s`` for the checkpoint."""
    _job(request, job_id)  # another project's job is not found
    service = _service(request)
    root, wait_s = service.engine.storage, service.limits.job_limits.pause_wait_s
    record = jobs.pause(root, job_id, get_principal(request).key_id, wait_s)
    _admit_if_connected(root)  # its CPUs are free: jobs waiting behind it may start
    return jobs.job_object(record)


@router.post("/v1/fine_tuning/jobs/{job_id}/resume")
def resume_job(job_id: str, request: Request) -> dict[str, Any]:
    """Queue a paused job again; its run continues from its newest complete checkpoint."""
    _job(request, job_id)  # another project's job is not found
    root = _service(request).engine.storage
    jobs.resume(root, job_id, get_principal(request).key_id)
    _admit_if_connected(root)  # it starts now if it fits, in its turn
    record = jobs.read_job(root, job_id)
    if job_queue.is_waiting(record):
        record = jobs.with_queue_positions(jobs.list_jobs(root), record)
    return jobs.job_object(record)


@router.get("/v1/fine_tuning/jobs/{job_id}/events")
def job_events(job_id: str, request: Request) -> dict[str, Any]:
    root = _service(request).engine.storage
    record = jobs.refresh(root, _job(request, job_id))
    events = jobs.job_events(root, record)
    return jobs.listing(events, request.query_params.get("after"), _limit(request, 20))


@router.get("/v1/fine_tuning/jobs/{job_id}/checkpoints")
def job_checkpoints(job_id: str, request: Request) -> dict[str, Any]:
    root = _service(request).engine.storage
    checkpoints = jobs.job_checkpoints(root, _job(request, job_id))
    listed = jobs.listing(checkpoints, request.query_params.get("after"), _limit(request, 10))
    listed["first_id"] = listed["data"][0]["id"] if listed["data"] else None
    listed["last_id"] = listed["data"][-1]["id"] if listed["data"] else None
    return listed
