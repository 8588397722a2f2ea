"""Generation during evaluation (``eval.metrics``), the ``eval.general`` check and QLoRA
settings: what is split, scored and refused, on tiny-llama without Ray."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from rayft.trainers.config import ConfigError, validate_spec
from rayft.trainers.generation_eval import (
    batch_samples,
    general_examples,
    general_line,
    general_record,
    general_scores,
    generation_scores,
    split_sample,
)
from rayft.trainers.loss import IGNORE_INDEX
from rayft.trainers.metrics import generation_metrics
from rayft.trainers.packing import collate, pack_examples

X = IGNORE_INDEX


def test_split_sample_takes_the_prompt_and_the_first_answer():
    ids = [1, 2, 3, 4, 5, 6, 7, 8]
    labels = [X, X, 3, 4, X, X, 7, 8]  # two assistant turns
    assert split_sample(ids, labels) == ([1, 2], [3, 4])
    assert split_sample(ids, [X] * 8) is None
    assert split_sample(ids, ids) is None  # a text row: no prompt to answer


def _column(rows):
    column = np.empty(len(rows), dtype=object)
    column[:] = [np.asarray(r) for r in rows]
    return column


def test_batch_samples_from_unpacked_and_packed_batches():
    examples = [
        {"input_ids": [5, 6, 7], "labels": [X, 6, 7], "sample_id": "a"},
        {"input_ids": [8, 9, 10, 11], "labels": [X, X, 10, 11], "sample_id": "b"},
    ]
    plain = collate(
        {
            "input_ids": _column([e["input_ids"] for e in examples]),
            "labels": _column([e["labels"] for e in examples]),
            "sample_ids": _column([[e["sample_id"]] for e in examples]),
            "num_truncated": np.zeros(2),
        },
        0,
        False,
    )
    expected = [([5], [6, 7]), ([8, 9], [10, 11])]
    assert batch_samples(plain) == expected
    rows = pack_examples(examples, 16)
    packed = collate(
        {
            "input_ids": _column([r["input_ids"] for r in rows]),
            "labels": _column([r["labels"] for r in rows]),
            "position_ids": _column([r["position_ids"] for r in rows]),
            "segment_ids": _column([r["segment_ids"] for r in rows]),
            "sample_ids": _column([r["sample_ids"] for r in rows]),
            "num_truncated": np.zeros(len(rows)),
        },
        0,
        True,
    )
    assert sorted(batch_samples(packed)) == sorted(expected)


def test_builtin_general_set_ships_fifty_answerable_rows(tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    examples = general_examples("builtin:general", tokenizer, 128)
    assert len(examples) == 50
    prompt, answer = split_sample(list(examples[0][0]), list(examples[0][1]))
    assert "capital of France" in tokenizer.decode(prompt)
    assert tokenizer.decode(answer, skip_special_tokens=True).strip() == "Paris"


def test_general_record_and_line():
    before = {"loss": 2.0, "perplexity": 7.39, "exact_match": 0.5}
    after = {"loss": 2.5, "perplexity": 12.18, "exact_match": 0.25}
    record = general_record("builtin:general", 50, before, after)
    assert record["delta"] == {
        "loss": pytest.approx(0.5),
        "perplexity": pytest.approx(4.79),
        "exact_match": pytest.approx(-0.25),
    }
    line = general_line(record)
    assert line.count("\n") == 0
    assert "builtin:general" in line and "loss 2 -> 2.5 (+0.5)" in line
    assert "exact_match 0.5 -> 0.25 (-0.25)" in line


class Engine(nn.Module):
    """What the loop's worker holds: a callable model with the model as ``module``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.module = model

    def forward(self, **inputs):
        return self.module(**inputs)


class OneWorker:
    """The parts of ``trainers.loop.Worker`` generation reads, for a single process."""

    def __init__(self, model_dir, spec, general=()) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        self.engine = Engine(model)
        self.spec, self.rank, self.world = spec, 0, 1
        self.device = torch.device("cpu")
        self.pad_id = self.tokenizer.pad_token_id or self.tokenizer.eos_token_id

        class Inputs:
            pass

        self.inputs = Inputs()
        self.inputs.general = general


def _alone(worker: OneWorker, prompt: list[int], n: int) -> str:
    from rayft.trainers.formats import end_of_turn_ids

    x = torch.tensor([prompt])
    out = worker.engine.module.generate(
        input_ids=x,
        attention_mask=torch.ones_like(x),
        max_new_tokens=n,
        do_sample=False,
        eos_token_id=sorted(end_of_turn_ids(worker.tokenizer)),
        pad_token_id=worker.pad_id,
    )
    return worker.tokenizer.decode(out[0, x.shape[1] :], skip_special_tokens=True).strip()


def _spec(tmp_path, **eval_):
    data = tmp_path / "t.jsonl"
    data.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    return validate_spec(
        {
            "model": {"name": "tiny-llama"},
            "data": {"train": str(data), "eval": str(data)},
            "optim": {"batch_size": 4},
            "eval": eval_,
        }
    )


def test_generation_scores_are_the_metrics_of_each_prompts_greedy_answer(tiny_model_dir, tmp_path):
    spec = _spec(tmp_path, metrics=["exact_match", "token_f1", "rouge_l", "bleu"], max_new_tokens=6)
    worker = OneWorker(tiny_model_dir, spec)
    tok = worker.tokenizer
    rows = [("what is one", " one"), ("the quick brown fox", " jumps over"), ("hi", " there")]
    ids = [tok(p + c)["input_ids"] for p, c in rows]
    cut = [len(tok(p)["input_ids"]) for p, _ in rows]
    labels = [[X] * k + i[k:] for i, k in zip(ids, cut, strict=True)]
    width = max(map(len, ids))
    batch = {
        "input_ids": torch.tensor([i + [0] * (width - len(i)) for i in ids]),
        "labels": torch.tensor([lab + [X] * (width - len(lab)) for lab in labels]),
        "attention_mask": torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i in ids]),
        "position_ids": torch.arange(width).expand(3, width),
    }
    scores = generation_scores(worker, [batch])
    predictions = [_alone(worker, i[:k], 6) for i, k in zip(ids, cut, strict=True)]
    references = [tok.decode(i[k:]).strip() for i, k in zip(ids, cut, strict=True)]
    expected = generation_metrics(predictions, references, spec.eval.metrics)
    assert scores == {f"eval_{k}": pytest.approx(v) for k, v in expected.items()}


def test_general_scores_loss_is_teacher_forced_loss_of_the_answers(tiny_model_dir, tmp_path):
    from rayft.trainers.loss import perplexity

    spec = _spec(tmp_path, general="builtin:general", max_new_tokens=4)
    worker = OneWorker(tiny_model_dir, spec)
    examples = general_examples("builtin:general", worker.tokenizer, 128)[:5]
    worker.inputs.general = examples
    scores = general_scores(worker)
    total = count = 0.0
    model = worker.engine.module
    for ids, labels in examples:
        with torch.no_grad():
            out = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels]))
        n = sum(1 for label in labels[1:] if label != X)
        total += float(out.loss) * n
        count += n
    assert scores["loss"] == pytest.approx(total / count, rel=1e-4)
    assert scores["perplexity"] == pytest.approx(perplexity(total / count))
    answers = [_alone(worker, *split_sample(list(i), list(lab))[:1], 4) for i, lab in examples]
    refs = [
        worker.tokenizer.decode(split_sample(list(i), list(lab))[1], skip_special_tokens=True)
        for i, lab in examples
    ]
    expected = generation_metrics(answers, [r.strip() for r in refs], ["exact_match"])
    assert scores["exact_match"] == pytest.approx(expected["exact_match"])


def _problems(tmp_path, **extra):
    data = tmp_path / "t.jsonl"
    data.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    spec = {"data": {"train": str(data)}, **extra}
    with pytest.raises(ConfigError) as err:
        validate_spec(spec)
    found: dict[str, str] = {}
    for key, message in err.value.problems:
        found[key] = f"{found[key]} | {message}" if key in found else message
    return found


def test_eval_metrics_refusals(tmp_path):
    problems = _problems(tmp_path, eval={"metrics": ["meteor", "bleu"]})
    assert "unknown metric 'meteor'" in problems["eval.metrics"]
    problems = _problems(tmp_path, eval={"metrics": ["bleu"]})
    assert "need evaluation data" in problems["eval.metrics"]
    problems = _problems(tmp_path, objective="dpo", eval={"metrics": ["bleu"]})
    assert "objective dpo" in problems["eval.metrics"]
    problems = _problems(tmp_path, objective="classification", eval={"metrics": ["bleu"]})
    assert "objective classification" in problems["eval.metrics"]
    problems = _problems(tmp_path, deepspeed={"zero_stage": 3}, eval={"general": "builtin:general"})
    assert "ZeRO stage 3" in problems["eval.general"]


def test_eval_general_refusals(tmp_path):
    problems = _problems(tmp_path, eval={"general": "builtin:trivia"})
    assert "no builtin set 'builtin:trivia'" in problems["eval.general"]
    problems = _problems(tmp_path, objective="classification", eval={"general": "builtin:general"})
    assert "classification" in problems["eval.general"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_qlora_is_refused_without_cuda_naming_method(tmp_path):
    problems = _problems(tmp_path, method="qlora")
    assert "method: qlora needs a CUDA GPU" in problems["method"]
    assert "use method lora" in problems["method"]
    problems = _problems(tmp_path, method="qlora", scaling={"use_gpu": False})
    assert "scaling.use_gpu is false" in problems["method"]
    # Workers promised GPUs elsewhere (a CPU head node): accepted here, checked on them.
    data = tmp_path / "t.jsonl"
    spec = validate_spec(
        {"data": {"train": str(data)}, "method": "qlora", "scaling": {"use_gpu": True}}
    )
    assert spec.method == "qlora"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_qlora_worker_refuses_without_cuda():
    from rayft.trainers.quantization import qlora_load_kwargs

    with pytest.raises(RuntimeError, match="needs a CUDA GPU"):
        qlora_load_kwargs("bfloat16")


def test_qlora_quantization_is_nf4_double_quant_in_the_compute_dtype():
    from rayft.trainers.quantization import qlora_quantization

    config = qlora_quantization("bfloat16")
    assert config.load_in_4bit and not config.load_in_8bit
    assert config.bnb_4bit_quant_type == "nf4"
    assert config.bnb_4bit_use_double_quant
    assert config.bnb_4bit_compute_dtype == torch.bfloat16
    assert config.bnb_4bit_quant_storage == torch.bfloat16
