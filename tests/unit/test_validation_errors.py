"""One rule turns a pydantic error location into the key a user changes, for every schema."""

from __future__ import annotations

from typing import Annotated, Literal

import pytest
from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.testclient import TestClient
from pydantic import BaseModel, Field, ValidationError

from rayft.serving.openai_api import (
    ChatCompletionRequest,
    CompletionRequest,
    EvaluationRequest,
    invalid_body,
)
from rayft.trainers.config import ConfigError, validate_spec
from rayft.trainers.validation_errors import error_key, is_type_tag, union_tags


def locations(model: type[BaseModel], data: dict) -> list[tuple]:
    with pytest.raises(ValidationError) as err:
        model.model_validate(data)
    return [e["loc"] for e in err.value.errors()]


def test_union_tags_are_dropped_and_field_names_that_look_like_tags_are_kept():
    class Body(BaseModel):
        strategy: int
        string_x: int
        integer: int
        listing: int
        train: str | list[str]

    locs = locations(
        Body, {"strategy": "a", "string_x": "b", "integer": "c", "listing": "d", "train": "t"}
    )
    locs += locations(Body, {"strategy": 1, "string_x": 1, "integer": 1, "listing": 1, "train": 5})
    keys = [error_key(loc, Body) for loc in locs]
    assert keys[:4] == ["strategy", "string_x", "integer", "listing"]
    # `train` failed as a str and as a list[str]: both name the field itself.
    assert keys[4:] == ["train", "train"]
    assert [loc[1] for loc in locs[4:]] == ["str", "list[str]"]


def test_every_tag_form_pydantic_gives_is_dropped():
    class Item(BaseModel):
        x: int

    class A(BaseModel):
        type: Literal["a"]
        v: int

    class B(BaseModel):
        type: Literal["b"]
        w: int

    class Body(BaseModel):
        a: Annotated[int, Field(ge=1)] | str = 1
        b: Literal["all-linear"] | list[str] = "all-linear"
        c: str | Item | None = None
        d: dict[str, float] | bool = False
        e: Annotated[A | B, Field(discriminator="type")] | None = None

    cases = [
        ({"a": 0.5}, "a", "constrained-int"),
        ({"b": [1]}, "b.0", "literal['all-linear']"),
        ({"c": {"x": "y"}}, "c.x", "Item"),
        ({"d": {"k": "v"}}, "d.k", "dict[str,float]"),
        ({"e": {"type": "a", "v": "x"}}, "e.v", "a"),
    ]
    for data, key, tag in cases:
        locs = locations(Body, data)
        assert any(tag in loc for loc in locs), (tag, locs)
        assert {error_key(loc, Body) for loc in locs} <= {key, key.split(".")[0]}
        assert key in {error_key(loc, Body) for loc in locs}
    # Schema-only tags are dropped where the schema puts them, not as names elsewhere:
    # the field `a` is kept though `a` tags a member of the tagged union `e`.
    assert union_tags(Body)[("c",)] == {"Item"} and {"a", "b"} <= union_tags(Body)[("e",)]
    assert error_key(("a", "str"), Body) == "a" and error_key(("c", "Item", "x"), Body) == "c.x"
    assert not is_type_tag("Item") and not is_type_tag("a")
    assert is_type_tag("function-after[f(), str]") and is_type_tag("function-plain[g()]")
    assert not is_type_tag("function-after") and not is_type_tag("list_of_things")
    assert not is_type_tag(0)


def test_http_locations_lose_only_a_leading_body_or_query():
    assert error_key(("body", "stream"), http=True) == "stream"
    assert error_key(("query", "limit"), http=True) == "limit"
    assert error_key(("body",), http=True) == ""
    assert error_key(("rayft", "body"), http=True) == "rayft.body"
    assert error_key(("body", "stream")) == "body.stream"  # not HTTP: a key like any other


def test_job_spec_errors_name_the_key_without_union_tags():
    with pytest.raises(ConfigError) as err:
        validate_spec({"data": {"train": 5}, "lora": {"target_modules": "some"}})
    keys = [key for key, _ in err.value.problems]
    assert sorted(set(keys)) == ["data.train", "lora.target_modules"]


def test_a_bad_stream_value_answers_param_stream():
    # The inference routes' own bodies and validation-error handler, on a bare app.
    app = FastAPI()
    app.add_exception_handler(RequestValidationError, invalid_body)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest) -> dict:
        return {}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest) -> dict:
        return {}

    @app.post("/v1/evaluations")
    async def evaluations(body: EvaluationRequest) -> dict:
        return {}

    client = TestClient(app)

    def param(path: str, body: dict) -> str:
        answer = client.post(path, json=body)
        assert answer.status_code == 422, answer.text
        return answer.json()["error"]["param"]

    assert param("/v1/completions", {"model": "m", "prompt": "x", "stream": "maybe"}) == "stream"
    assert param("/v1/completions", {"model": "m", "prompt": [{}]}) == "prompt"
    messages = [{"role": "user", "content": "hi"}]
    assert param("/v1/chat/completions", {"model": "m", "messages": messages, "stop": 3}) == "stop"
    log = {"model": "m", "dataset": {"request_log": 5}}
    assert param("/v1/evaluations", log).startswith("dataset")
    assert "LogDataset" not in param("/v1/evaluations", log)
