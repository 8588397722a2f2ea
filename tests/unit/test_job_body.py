"""What a fine-tuning job body may hold: the extension's allow-list and bounded JSON numbers."""

from __future__ import annotations

import typing
from typing import Any, Literal

import pytest
from pydantic import BaseModel

from rayft.cluster import fine_tuning as jobs
from rayft.cluster import job_body
from rayft.serving.errors import BadRequest
from rayft.trainers.config import JobSpec, schema_keys


def spec_of(extension: dict[str, Any], **body: Any) -> JobSpec:
    request = jobs.parse_request(
        {"model": "tiny-llama", "training_file": "file-a", "rayft": extension, **body}
    )
    spec, _ = jobs.build_spec(
        request,
        base_model="tiny-llama",
        parent_adapter=None,
        train_url="/data/train.jsonl",
        eval_url=None,
        storage="/root",
        output_name="ft:tiny-llama:ftjob-1",
    )
    return jobs.validate_job_spec(spec, request)


def refusal(extension: dict[str, Any], **body: Any) -> BadRequest:
    with pytest.raises(BadRequest) as caught:
        spec_of(extension, **body)
    assert caught.value.status == 400
    return caught.value


# ------------------------------------------------------------ the schema walk


def _section(annotation: Any) -> type[BaseModel] | None:
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def leaves(model: type[BaseModel], prefix: str = "") -> dict[str, Any]:
    """Every leaf field of ``model``, nested models walked, as ``{dotted key: annotation}``."""
    found: dict[str, Any] = {}
    for name, field in model.model_fields.items():
        section = _section(field.annotation)
        if section is not None:
            found.update(leaves(section, f"{prefix}{name}."))
        else:
            found[f"{prefix}{name}"] = field.annotation
    return found


def holds_text(annotation: Any) -> bool:
    """True when the annotation accepts free text (``str``), not only fixed choices."""
    if annotation is str:
        return True
    if typing.get_origin(annotation) is Literal:
        return False
    return any(holds_text(arg) for arg in typing.get_args(annotation))


def refused_by_job(key: str) -> bool:
    parts = key.split(".")
    return any(".".join(parts[:i]) in job_body.SET_BY_JOB for i in range(1, len(parts) + 1))


def misclassified(model: type[BaseModel]) -> list[str]:
    """The leaf keys of ``model`` that ``cluster.job_body`` does not classify correctly."""
    wrong = []
    for key, annotation in leaves(model).items():
        if refused_by_job(key):
            if key in job_body.ALLOWED:
                wrong.append(f"{key}: both allowed and set by the job")
            continue
        allowed = job_body.ALLOWED.get(key)
        if allowed is None:
            wrong.append(
                f"{key}: a new job-spec key; classify it in cluster.job_body.ALLOWED (a plain "
                "value or a reference) or SET_BY_JOB; until then a job body may not set it"
            )
        elif allowed.refs and not holds_text(annotation):
            wrong.append(f"{key}: a reference, but it holds no name")
        elif not allowed.refs and holds_text(annotation) and key not in job_body.NAMES_NOTHING:
            # Text in a plain value could name a file, a URI or a module: each such key is
            # listed with what its text names, inside the model or the data.
            wrong.append(f"{key}: holds text but is tagged a plain value")
    return wrong


def test_every_job_spec_field_is_classified():
    fields = leaves(JobSpec)
    assert set(fields) == set(schema_keys())  # the walk sees what `rayft validate --schema` lists
    assert misclassified(JobSpec) == []
    assert set(job_body.ALLOWED) <= set(fields)
    assert set(job_body.NAMES_NOTHING) <= set(job_body.ALLOWED)
    refs = {k: a.refs for k, a in job_body.ALLOWED.items() if a.refs}
    assert refs == {"eval.general": ("builtin", "file_id")}


def test_a_new_spec_field_fails_the_classification_and_is_refused():
    class PluginSpec(BaseModel):
        module: str = "builtins"
        enabled: bool = False

    class FutureSpec(JobSpec):
        plugins: PluginSpec = PluginSpec()

    assert [w.split(":")[0] for w in misclassified(FutureSpec)] == [
        "plugins.module",
        "plugins.enabled",
    ]
    error = refusal({"plugins": {"module": "os"}})
    assert error.param == "rayft.plugins"
    assert "the rayft extension may set" in error.message and "optim" in error.message


# ------------------------------------------------------- paths and references


@pytest.mark.parametrize(
    "value",
    [
        "/etc/passwd",
        "/no/such/file.jsonl",
        "s3://other/x.jsonl",
        "file:///etc/passwd",
        "../../datasets/file-abc.jsonl",
        "builtin:secrets",
        "file-abc/../../x",
        {"path": "/etc/passwd"},
    ],
)
def test_paths_and_uris_are_refused_without_being_read(value):
    error = refusal({"eval": {"general": value}})
    assert error.param == "rayft.eval.general"
    assert "builtin:general" in error.message and "file-" in error.message
    # The same answer for a file that exists and one that does not: nothing was looked up.
    assert error.message == refusal({"eval": {"general": "/etc/passwd"}}).message


@pytest.mark.parametrize(
    ("extension", "param"),
    [
        ({"eval": {"general_v2": "/etc/passwd"}}, "rayft.eval.general_v2"),
        ({"data": {"cache_dir": "/tmp"}}, "rayft.data.cache_dir"),
        ({"data": {"train": "s3://another-bucket/x.jsonl"}}, "rayft.data.train"),
        ({"storage": "s3://another-bucket/"}, "rayft.storage"),
        ({"output": {"overwrite": True}}, "rayft.output"),
        ({"tune": {"num_samples": 2}}, "rayft.tune"),
        ({"model": {"name": "/etc"}}, "rayft.model.name"),
        ({"scaling": {"resources_per_worker": {"GPU": 8}}}, "rayft.scaling.resources_per_worker"),
        ({"lora": {"target_modules": ["q" * 300]}}, "rayft.lora.target_modules"),
        ({"eval": {"metrics": {"exact_match": "/etc/passwd"}}}, "rayft.eval.metrics"),
    ],
)
def test_keys_off_the_allow_list_are_400_naming_the_key(extension, param):
    error = refusal(extension)
    assert error.param == param
    assert error.message.startswith(param)


def test_unknown_key_errors_say_what_is_allowed():
    error = refusal({"eval": {"general_v2": "x"}})
    assert "under rayft.eval may set" in error.message
    assert "general" in error.message and "every_steps" in error.message


def test_builtins_and_file_ids_are_accepted():
    spec = spec_of({"eval": {"general": "builtin:general"}, "lora": {"r": 4}})
    assert spec.eval.general == "builtin:general" and spec.lora.r == 4
    extension = {"eval": {"general": "file-0123abcd"}, "optim": {"lr": 1e-3}}
    assert job_body.file_references(extension) == {"eval.general": "file-0123abcd"}
    assert job_body.file_references({"eval": {"general": "builtin:general"}}) == {}
    assert job_body.file_references(None) == {}
    # Older spellings of the objective are still plain values.
    older = spec_of({"method": "dpo", "dpo": {"weights": "full"}}, method={"type": "dpo"})
    assert (older.objective, older.method) == ("dpo", "full")


# --------------------------------------------------------------- JSON numbers


@pytest.mark.parametrize(
    ("raw", "param"),
    [
        (b'{"seed": ' + b"7" * 5000 + b"}", "seed"),
        (b'{"rayft": {"optim": {"max_steps": ' + b"9" * 101 + b"}}}", "rayft.optim.max_steps"),
        (b'{"rayft": {"optim": {"lr": Infinity}}}', "rayft.optim.lr"),
        (b'{"rayft": {"optim": {"lr": -Infinity}}}', "rayft.optim.lr"),
        (b'{"hyperparameters": {"learning_rate_multiplier": NaN}}', None),
        (b'{"rayft": {"lora": {"alpha": 1e400}}}', "rayft.lora.alpha"),
        (b'{"metadata": [1, 2, ' + b"3" * 4400 + b"]}", "metadata.2"),
    ],
)
def test_json_numbers_out_of_bounds_are_400_naming_the_key(raw, param):
    with pytest.raises(BadRequest) as caught:
        job_body.load_json(raw)
    assert caught.value.status == 400 and caught.value.code == "invalid_request"
    expected = param or "hyperparameters.learning_rate_multiplier"
    assert caught.value.param == expected and caught.value.message.startswith(expected)


def test_json_within_bounds_parses_as_usual():
    raw = b'{"seed": ' + b"9" * 9 + b', "rayft": {"optim": {"lr": 2.5e-4}}, "x": [true, null]}'
    assert job_body.load_json(raw) == {
        "seed": 999999999,
        "rayft": {"optim": {"lr": 2.5e-4}},
        "x": [True, None],
    }
    for bad in (b"{", b"\xff", b"[" * 100_000):
        with pytest.raises(BadRequest) as caught:
            job_body.load_json(bad)
        assert caught.value.code == "invalid_json"


@pytest.mark.parametrize("value", [float("inf"), float("nan"), -1.0, 0.0])
def test_learning_rate_multiplier_is_finite_and_positive(value):
    with pytest.raises(BadRequest) as caught:
        jobs.parse_request(
            {
                "model": "tiny-llama",
                "training_file": "file-a",
                "hyperparameters": {"learning_rate_multiplier": value},
            }
        )
    assert caught.value.param == "hyperparameters.learning_rate_multiplier"
