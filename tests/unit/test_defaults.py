"""Per-method training defaults: they fill only the keys a spec leaves unset, explicit values
win, the effective batch gives the same optimizer steps on 1, 2 or 4 workers, and the plan
line says what was chosen."""

from __future__ import annotations

import pytest

from rayft.trainers import defaults
from rayft.trainers.config import JobSpec, validate_spec
from rayft.trainers.driver import plan_line, plan_steps


def spec(**sections) -> JobSpec:
    return validate_spec({"data": {"train": "t.jsonl"}, **sections})


@pytest.mark.parametrize(
    ("objective", "method", "lr"),
    [
        ("sft", "lora", defaults.LORA_LR),
        ("sft", "full", defaults.FULL_LR),
        ("sft", "freeze", defaults.FULL_LR),
        ("dpo", "lora", defaults.DPO_LORA_LR),
        ("dpo", "full", defaults.DPO_FULL_LR),
        ("classification", "lora", defaults.LORA_LR),
        ("classification", "full", defaults.FULL_LR),
    ],
)
def test_the_learning_rate_follows_objective_and_method(objective, method, lr):
    data = {"train": "t.jsonl", **({"format": "preference"} if objective == "dpo" else {})}
    chosen = validate_spec({"data": data, "objective": objective, "method": method})
    assert chosen.optim.lr == lr
    assert chosen.dpo.beta == defaults.DPO_BETA
    # A rate the spec sets wins, whatever the method.
    given = validate_spec(
        {"data": data, "objective": objective, "method": method, "optim": {"lr": 3e-3}}
    )
    assert given.optim.lr == 3e-3


def test_a_bare_spec_gets_rslora_at_rank_16_and_explicit_lora_values_win():
    bare = spec().lora
    assert (bare.r, bare.alpha, bare.use_rslora) == (16, defaults.RSLORA_ALPHA, True)
    assert bare.alpha / bare.r**0.5 == 32 / 16  # rank 16's scale is the classic alpha 32 / r 16
    # An alpha written for alpha / r keeps alpha / r.
    classic = spec(lora={"r": 8, "alpha": 16}).lora
    assert (classic.r, classic.alpha, classic.use_rslora) == (8, 16, False)
    # rsLoRA turned off without an alpha: alpha = 2 r.
    off = spec(lora={"r": 8, "use_rslora": False}).lora
    assert (off.alpha, off.use_rslora) == (16, False)
    both = spec(lora={"alpha": 4, "use_rslora": True}).lora
    assert (both.alpha, both.use_rslora) == (4, True)


def test_an_explicit_optim_section_trains_as_it_did_before():
    given = {"lr": 3e-3, "max_steps": 4, "batch_size": 4, "warmup_ratio": 0.0}
    optim = spec(optim=given, scaling={"num_workers": 2}).optim
    assert (optim.lr, optim.batch_size, optim.grad_accum, optim.warmup_ratio) == (3e-3, 4, 1, 0.0)
    assert optim.effective_batch == 8  # 4 x 1 x 2, shown as what it is
    accum_only = spec(optim={"grad_accum": 2}, scaling={"num_workers": 1}).optim
    assert (accum_only.batch_size, accum_only.grad_accum) == (8, 2)
    both = spec(optim={"batch_size": 2, "grad_accum": 3, "effective_batch": 64}).optim
    assert (both.batch_size, both.grad_accum, both.effective_batch) == (2, 3, 12)


@pytest.mark.parametrize("effective", [8, 16, 32])
@pytest.mark.parametrize("rows", [200, 301, 1000])
def test_one_two_or_four_workers_take_the_same_steps(effective, rows):
    steps = set()
    for workers in (1, 2, 4):
        chosen = spec(optim={"effective_batch": effective}, scaling={"num_workers": workers})
        optim = chosen.optim
        assert optim.batch_size * optim.grad_accum * workers == effective == optim.effective_batch
        assert optim.batch_size <= defaults.MICRO_BATCH
        steps.add(plan_steps(chosen, rows, workers))
    # Without accumulation the counts are equal; with it (one worker at 16 or 32) the last
    # partial window of an epoch rounds down, so they may differ by one step.
    assert max(steps) - min(steps) <= (0 if effective == defaults.MICRO_BATCH else 1)
    assert all(abs(s - rows / effective) <= 1 for s in steps)


def test_the_default_effective_batch_gives_the_same_steps_on_any_worker_count():
    plans = {w: spec(scaling={"num_workers": w}) for w in (1, 2, 4)}
    assert {plan_steps(s, 200, w) for w, s in plans.items()} == {25}
    assert [(s.optim.batch_size, s.optim.grad_accum) for s in plans.values()] == [
        (8, 1),
        (4, 1),
        (2, 1),
    ]


def test_split_batch_rounds_up_and_keeps_what_is_given():
    assert defaults.split_batch(16, 1) == (8, 2)
    assert defaults.split_batch(16, 3) == (6, 1)  # 18 a step: a multiple of the workers
    assert defaults.split_batch(8, 16) == (1, 1)  # more workers than examples: one each
    assert defaults.split_batch(32, 2, batch_size=4) == (4, 4)
    assert defaults.split_batch(32, 2, grad_accum=8) == (2, 8)
    assert defaults.split_batch(24, 1) == (8, 3)


def test_a_resolved_spec_validates_to_itself_however_it_was_made():
    data = {"data": {"train": "t.jsonl"}, "method": "full", "scaling": {"num_workers": 4}}
    resolved = validate_spec(data)
    assert JobSpec.model_validate(data) == JobSpec(**data) == resolved
    assert validate_spec(resolved.to_dict()) == resolved
    assert resolved.to_dict()["optim"]["lr"] == defaults.FULL_LR  # the saved spec shows it


def test_the_plan_line_says_steps_effective_batch_and_learning_rate():
    chosen = spec(scaling={"num_workers": 2})
    assert plan_line(chosen, plan_steps(chosen, 200, 2), 200) == (
        "[rayft] plan: 25 optimizer steps (1 epoch of 200 rows), effective batch 8 "
        "(4 per worker x 1 accumulation x 2 workers), lr 0.001 (the lora default), cosine, "
        "1 warm-up step"
    )
    given = spec(
        method="full",
        optim={"lr": 1e-4, "max_steps": 40, "batch_size": 2, "grad_accum": 4, "epochs": 2},
        scaling={"num_workers": 1},
    )
    assert plan_line(given, 40, 99) == (
        "[rayft] plan: 40 optimizer steps (optim.max_steps), effective batch 8 "
        "(2 per worker x 4 accumulation x 1 worker), lr 0.0001, cosine, 2 warm-up steps"
    )
    dpo = validate_spec({"data": {"train": "t.jsonl", "format": "preference"}, "objective": "dpo"})
    assert "lr 5e-06 (the dpo lora default)" in plan_line(dpo, 10, 80)
