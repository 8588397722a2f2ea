"""OpenAI's grader routes over real HTTP, driven by the unchanged ``openai`` client.

``client.fine_tuning.alpha.graders.run(...)`` and ``.validate(...)`` against the API
(inference plus the fine-tuning routes, as the rayft service mounts them) on tiny-llama
on 127.0.0.1 in this process, no Ray: answers parse as openai-python's
``GraderRunResponse`` / ``GraderValidateResponse``, bad grader JSON is a 400 in OpenAI's
error shape naming the key, a judge model this server does not serve is a 404 naming
it, and a grader that fails while grading scores 0 with the failure in
``metadata.errors``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from serving_http import http_server

pytestmark = pytest.mark.fault

KEY = "graders-key"
EXACT = {
    "type": "string_check",
    "name": "exact",
    "input": "{{ sample.output_text }}",
    "reference": "{{ item.answer }}",
    "operation": "eq",
}


@pytest.fixture(scope="module")
def api(rayft_home: Path, tiny_model_dir: Path) -> Iterator[SimpleNamespace]:
    import openai

    from rayft.cluster.fine_tuning_api import router as fine_tuning_router
    from rayft.serving.engine import ModelEngine
    from rayft.serving.openai_api import create_api
    from rayft.serving.service import Limits, ModelService

    engine = ModelEngine("tiny-llama", storage=str(rayft_home), dtype="float32")
    service = ModelService(engine, Limits(max_tokens_limit=8, max_prompt_tokens=256), api_key=KEY)
    with http_server(create_api(service, [fine_tuning_router])) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)
        yield SimpleNamespace(url=url, client=client)
    service.close()


def test_validate_returns_the_grader_as_openai_does(api):
    multi = {
        "type": "multi",
        "name": "blend",
        "graders": {
            "exact": EXACT,
            "overlap": {
                **EXACT,
                "type": "text_similarity",
                "name": "overlap",
                "operation": None,
                "evaluation_metric": "rouge_l",
            },
        },
        "calculate_output": "0.5 * exact + 0.5 * overlap",
    }
    multi["graders"]["overlap"].pop("operation")
    answer = api.client.fine_tuning.alpha.graders.validate(grader=EXACT)
    assert answer.grader.type == "string_check" and answer.grader.operation == "eq"
    answer = api.client.fine_tuning.alpha.graders.validate(grader=multi)
    assert answer.grader.type == "multi"
    assert answer.grader.calculate_output == "0.5 * exact + 0.5 * overlap"


def test_run_scores_a_sample_and_reports_no_errors(api):
    graders = api.client.fine_tuning.alpha.graders
    hit = graders.run(grader=EXACT, model_sample="Paris", item={"answer": "Paris"})
    miss = graders.run(grader=EXACT, model_sample="Lyon", item={"answer": "Paris"})
    assert (hit.reward, miss.reward) == (1.0, 0.0)
    assert hit.metadata.name == "exact" and hit.metadata.type == "string_check"
    assert not any(
        value for key, value in hit.metadata.errors.model_dump().items() if key.endswith("error")
    )


def test_python_grader_runs_and_a_raising_one_scores_zero_with_its_error(api):
    graders = api.client.fine_tuning.alpha.graders
    source = "def grade(sample, item):\n    return len(sample['output_text']) / item['n']\n"
    python = {"type": "python", "name": "length", "source": source}
    ok = graders.run(grader=python, model_sample="abcd", item={"n": 8})
    assert ok.reward == 0.5
    broken = graders.run(grader=python, model_sample="abcd", item={"m": 8})
    assert broken.reward == 0.0
    assert broken.metadata.errors.python_grader_runtime_error
    assert "KeyError: 'n'" in broken.metadata.errors.python_grader_runtime_error_details


def test_bad_grader_json_is_a_400_naming_the_key(api):
    import openai

    for grader, param in (
        ({**EXACT, "operation": "regex"}, "grader.operation"),
        ({**EXACT, "type": "no_such"}, "grader.type"),
        ({**EXACT, "input": "{{ item.__class__.__init__ }} {{ 7*7 }}"}, "grader.input"),
        (
            {
                "type": "multi",
                "name": "m",
                "graders": {"a": EXACT},
                "calculate_output": "__import__('os').system('id')",
            },
            "grader",
        ),
    ):
        with pytest.raises(openai.BadRequestError) as caught:
            api.client.fine_tuning.alpha.graders.validate(grader=grader)
        error = caught.value.body
        assert caught.value.status_code == 400 and error["param"] == param, error
        assert set(caught.value.response.json()["error"]) == {"message", "type", "code", "param"}
    answer = httpx.post(
        f"{api.url}/v1/fine_tuning/alpha/graders/run",
        json={"grader": EXACT},
        headers={"Authorization": f"Bearer {KEY}"},
    )
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "model_sample"


def test_judge_model_not_served_is_a_404_naming_it(api):
    import openai

    judge = {
        "type": "score_model",
        "name": "judge",
        "model": "gpt-4o-2024-08-06",
        "input": [{"role": "user", "content": "Score {{ sample.output_text }}"}],
    }
    with pytest.raises(openai.NotFoundError) as caught:
        api.client.fine_tuning.alpha.graders.run(grader=judge, model_sample="x", item={})
    assert "gpt-4o-2024-08-06" in caught.value.body["message"]


def test_score_model_asks_the_served_model_and_reports_an_unparsed_answer(api):
    judge = {
        "type": "label_model",
        "name": "judge",
        "model": "tiny-llama",
        "input": [{"role": "user", "content": "Is {{ sample.output_text }} {{ item.answer }}?"}],
        "labels": ["yes", "no"],
        "passing_labels": ["yes"],
    }
    answer = api.client.fine_tuning.alpha.graders.run(
        grader=judge, model_sample="Paris", item={"answer": "Paris"}
    )
    # tiny-llama is random: its answer is no label, which is reported, not raised.
    errors = answer.metadata.errors
    assert answer.reward == 0.0
    assert errors.api_model_grader_parse_error or errors.api_model_grader_server_error, errors
    if errors.api_model_grader_parse_error:
        assert answer.metadata.sampled_model_name == "tiny-llama"
        assert answer.metadata.token_usage > 0
