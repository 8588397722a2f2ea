"""DPO without Ray: row formats, tokenization, batching, the loss against TRL, spec errors."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from rayft.raytune.search_space import validate_search_space
from rayft.trainers.config import ConfigError, validate_spec
from rayft.trainers.data import DataError, scan_sources
from rayft.trainers.dpo import (
    DpoObjective,
    collate_pairs,
    dpo_losses,
    eval_metrics,
    preference_tokens,
)
from rayft.trainers.formats import RowError, check_row, detect_format, preference_pair
from rayft.trainers.loss import IGNORE_INDEX
from rayft.trainers.storage import StorageRoot

STANDARD = {"prompt": "name a red thing", "chosen": "the apple", "rejected": "the sky"}
CONVERSATIONAL = {
    "prompt": [{"role": "user", "content": "name a red thing"}],
    "chosen": [{"role": "assistant", "content": "the apple"}],
    "rejected": [{"role": "assistant", "content": "the sky"}],
}
IMPLICIT = {
    "chosen": [
        {"role": "user", "content": "name a red thing"},
        {"role": "assistant", "content": "the apple"},
    ],
    "rejected": [
        {"role": "user", "content": "name a red thing"},
        {"role": "assistant", "content": "the sky"},
    ],
}
OPENAI = {
    "input": {"messages": [{"role": "user", "content": "name a red thing"}]},
    "preferred_output": [{"role": "assistant", "content": "the apple"}],
    "non_preferred_output": [{"role": "assistant", "content": "the sky"}],
}


def spec_dict(**extra):
    data = {"model": {"name": "tiny-llama"}, "data": {"train": "t.jsonl"}, "objective": "dpo"}
    for key, value in extra.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return data


def problems(err: pytest.ExceptionInfo[ConfigError]) -> dict[str, str]:
    return dict(err.value.problems)


# --------------------------------------------------------------------------- row formats


@pytest.mark.parametrize("row", [STANDARD, CONVERSATIONAL, IMPLICIT, OPENAI])
def test_preference_shapes_are_detected_and_read(row):
    assert detect_format(row) == "preference"
    check_row(row, "preference")
    prompt, chosen, rejected = preference_pair(row)
    if row is STANDARD:
        assert (prompt, chosen, rejected) == ("name a red thing", "the apple", "the sky")
    else:
        assert prompt == [{"role": "user", "content": "name a red thing"}]
        assert chosen == [{"role": "assistant", "content": "the apple"}]
        assert rejected == [{"role": "assistant", "content": "the sky"}]


@pytest.mark.parametrize(
    ("row", "says"),
    [
        ({"prompt": "p", "chosen": "a"}, "missing field 'rejected'"),
        ({"chosen": "a", "rejected": "b"}, "missing field 'prompt'"),
        ({"prompt": "p", "chosen": 3, "rejected": "b"}, "'chosen' must be a string"),
        (
            {**CONVERSATIONAL, "chosen": [{"role": "user", "content": "x"}]},
            "'chosen' has no assistant turn",
        ),
        ({**IMPLICIT, "rejected": IMPLICIT["chosen"]}, "no differing turns"),
        ({**OPENAI, "input": {"text": "hi"}}, "'input' must be an object with 'messages'"),
        (
            {**OPENAI, "preferred_output": [{"role": "bot", "content": "x"}]},
            "preferred_output[0].role",
        ),
    ],
)
def test_bad_preference_rows_name_the_field(row, says):
    with pytest.raises(RowError, match=None) as err:
        check_row(row, "preference")
    assert says in str(err.value)


def test_scan_names_file_and_line(tmp_path: Path):
    chats = tmp_path / "chats.jsonl"
    chats.write_text("\n" + json.dumps({"messages": IMPLICIT["chosen"]}) + "\n")
    spec = validate_spec(spec_dict(data={"train": str(chats)}))
    with pytest.raises(DataError) as err:
        scan_sources(spec, root=StorageRoot.resolve())
    said = str(err.value)
    assert f"{chats}:2" in said and "objective dpo needs preference rows" in said

    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text(json.dumps(OPENAI) + "\n" + json.dumps({"prompt": "p", "chosen": "a"}) + "\n")
    with pytest.raises(DataError) as err:
        scan_sources(
            validate_spec(spec_dict(data={"train": str(prefs)})), root=StorageRoot.resolve()
        )
    assert f"{prefs}:2" in str(err.value) and "missing field 'rejected'" in str(err.value)

    prefs.write_text(json.dumps(STANDARD) + "\n")
    sft = validate_spec({"data": {"train": str(prefs)}, "method": "lora"})
    with pytest.raises(DataError) as err:
        scan_sources(sft, root=StorageRoot.resolve())
    assert f"{prefs}:1" in str(err.value) and "objective: dpo" in str(err.value)
    # Two pairs: one per training worker (fewer rows than workers is refused).
    prefs.write_text((json.dumps(STANDARD) + "\n") * 2)
    assert (
        scan_sources(
            validate_spec(spec_dict(data={"train": str(prefs)})), root=StorageRoot.resolve()
        ).format
        == "preference"
    )


# --------------------------------------------------------------------------- the spec


def test_spec_errors_name_the_key():
    with pytest.raises(ConfigError) as err:
        validate_spec(spec_dict(data={"train": "t.jsonl", "packing": True, "format": "chat"}))
    found = problems(err)
    assert "packing=false" in found["data.packing"]
    assert "preference" in found["data.format"]
    for method in ("freeze", "qlora"):
        with pytest.raises(ConfigError) as err:
            validate_spec(spec_dict(method=method, scaling={"use_gpu": True}))
        assert "objective dpo trains method lora" in problems(err)["method"]
        assert problems(err)["method"].endswith(f"(a frozen reference copy), not {method}")
    with pytest.raises(ConfigError) as err:
        validate_spec(spec_dict(objective="classification", method="dpo"))
    said = problems(err)["method"]
    assert "method: dpo (an older spelling) contradicts objective: classification" in said
    with pytest.raises(ConfigError) as err:
        validate_spec({"data": {"train": "t.jsonl", "format": "preference"}})
    assert "objective dpo" in problems(err)["data.format"]
    spec = validate_spec(spec_dict(method="full", dpo={"beta": 0.5, "loss": "ipo"}))
    assert (spec.objective, spec.method, spec.dpo.beta) == ("dpo", "full", 0.5)


def test_sweep_over_beta_is_validated():
    base = spec_dict(data={"train": "t.jsonl", "eval_fraction": 0.1})
    validate_search_space(base, {"dpo.beta": {"loguniform": [0.01, 1.0]}})
    with pytest.raises(ConfigError) as err:
        validate_search_space(base, {"dpo.beta": {"uniform": [-0.1, 0.5]}})
    assert "tune.search_space.dpo.beta" in problems(err)
    with pytest.raises(ConfigError) as err:
        validate_search_space(base, {"dpo.loss": {"choice": ["sigmoid", "hinge"]}})
    assert "tune.search_space.dpo.loss" in problems(err)


# --------------------------------------------------------------------------- tokens and batches


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.mark.parametrize("row", [STANDARD, CONVERSATIONAL, IMPLICIT, OPENAI])
def test_pairs_share_the_prompt_and_label_only_answers(row, tokenizer):
    out = preference_tokens(row, tokenizer, 512)
    chosen = tokenizer.decode(
        [t for t, lab in zip(out["input_ids"], out["labels"], strict=True) if lab >= 0]
    )
    rejected = tokenizer.decode(
        [
            t
            for t, lab in zip(out["rejected_input_ids"], out["rejected_labels"], strict=True)
            if lab >= 0
        ]
    )
    assert chosen == "the apple<|im_end|>" and rejected == "the sky<|im_end|>"
    n = out["labels"].index(next(lab for lab in out["labels"] if lab != IGNORE_INDEX))
    assert out["input_ids"][:n] == out["rejected_input_ids"][:n]
    assert "name a red thing" in tokenizer.decode(out["input_ids"][:n])
    # Every row shape tokenizes to the same pair.
    assert out == preference_tokens(OPENAI, tokenizer, 512)


def test_truncation_keeps_the_prompt_end_and_answer_start(tokenizer):
    row = {"prompt": "one two three four five six seven eight nine ten " * 4, "chosen": "a b c d e"}
    row["rejected"] = "x " * 40
    full = preference_tokens(row, tokenizer, 512)
    out = preference_tokens(row, tokenizer, 32)
    assert out["truncated"] and len(out["rejected_input_ids"]) == 32
    prompt_len = out["labels"].index(next(lab for lab in out["labels"] if lab != IGNORE_INDEX))
    full_prompt = full["labels"].index(next(lab for lab in full["labels"] if lab != IGNORE_INDEX))
    assert prompt_len == 16  # half of max_seq_len: the rejected answer is long
    assert (
        out["input_ids"][:prompt_len] == full["input_ids"][full_prompt - prompt_len : full_prompt]
    )
    assert out["input_ids"][prompt_len:] == full["input_ids"][full_prompt:]  # chosen fits
    assert out["rejected_input_ids"][prompt_len:] == full["rejected_input_ids"][full_prompt:][:16]
    assert preference_tokens(row, tokenizer, 8) is not None


def test_collate_puts_chosen_rows_first():
    import numpy as np

    batch = {
        "input_ids": np.array(
            [np.array([1, 2, 3]), np.array([], dtype=int), np.array([4, 5])], object
        ),
        "labels": np.array(
            [np.array([-100, 2, 3]), np.array([], int), np.array([-100, 5])], object
        ),
        "rejected_input_ids": np.array(
            [np.array([1, 9]), np.array([], int), np.array([4, 8, 8, 8])], object
        ),
        "rejected_labels": np.array(
            [np.array([-100, 9]), np.array([], int), np.array([-100, 8, 8, 8])], object
        ),
        "sample_ids": np.array([np.array(["a"]), np.array([]), np.array(["b"])], object),
        "num_truncated": np.array([0, 0, 1]),
        "num_dropped": np.array([2, 1, 0]),
    }
    out = collate_pairs(batch, pad_id=0)
    assert out["input_ids"].tolist() == [[1, 2, 3, 0], [4, 5, 0, 0], [1, 9, 0, 0], [4, 8, 8, 8]]
    assert out["labels"][2].tolist() == [-100, 9, -100, -100]
    assert out["attention_mask"].sum(1).tolist() == [3, 2, 2, 4]
    assert out["sample_ids"] == [["a"], ["b"]]
    assert (out["num_tokens"], out["num_dropped"], out["num_truncated"]) == (11, 3, 1)


# --------------------------------------------------------------------------- the loss


def test_losses_and_rewards_by_hand():
    policy = torch.tensor([-1.0, -2.0, -3.0, -1.0])  # chosen 0..1, rejected 2..3
    reference = torch.tensor([-2.0, -2.0, -2.0, -2.0])
    counts = torch.tensor([2, 4, 1, 1])
    losses, chosen, rejected = dpo_losses(policy, reference, counts, beta=0.5)
    assert torch.allclose(chosen, torch.tensor([0.5, 0.0]))
    assert torch.allclose(rejected, torch.tensor([-0.5, 0.5]))
    want = [-math.log(1 / (1 + math.exp(-0.5 * 2.0))), -math.log(1 / (1 + math.exp(0.5)))]
    assert torch.allclose(losses, torch.tensor(want))
    ipo, _, _ = dpo_losses(policy, reference, counts, beta=0.5, loss="ipo")
    assert torch.allclose(ipo, torch.tensor([(0.5 + 1.0 - 1.0) ** 2, (0.0 - 1.0 - 1.0) ** 2]))
    sums = {"loss_sum": 3.0, "pairs": 4.0, "correct": 3.0, "margin_sum": 2.0}
    metrics = eval_metrics(sums | {"chosen_sum": 1.0, "rejected_sum": -1.0})
    assert metrics["eval_reward_accuracy"] == 0.75 and metrics["eval_loss"] == 0.75
    assert metrics["eval_reward_margin"] == 0.5 and metrics["eval_rewards_rejected"] == -0.25


def _trl_rows() -> list[dict]:
    return [
        {
            "prompt": [{"role": "user", "content": f"name a {color} thing"}],
            "chosen": [{"role": "assistant", "content": f"the {thing} is {color}"}],
            "rejected": [{"role": "assistant", "content": f"the {thing} is not {color} at all"}],
        }
        for color, thing in [
            ("red", "apple"),
            ("blue", "sky"),
            ("green", "grass"),
            ("pink", "rose"),
        ]
    ]


def _seed_lora_b(model, seed: int, scale: float = 0.5) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name and ".default." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)


def _trl_first_batch(model, loss, tokenizer, tmp_path, peft_config=None):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(
        output_dir=str(tmp_path / "trl"),
        beta=0.2,
        loss_type=[loss],
        per_device_train_batch_size=4,
        report_to="none",
        use_cpu=True,
        max_length=128,
        dataloader_num_workers=0,
        gradient_checkpointing=False,
    )
    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(_trl_rows()),
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    return trainer, next(iter(trainer.get_train_dataloader()))


def _compare(trainer, batch, objective, worker):
    """TRL's loss and log-probs on its first batch against rayft's on the same tokens."""
    trainer.model.train()
    with torch.no_grad():
        trl_loss = float(trainer.compute_loss(trainer.model, batch))
        ours = {
            "input_ids": batch["input_ids"],
            "attention_mask": batch["attention_mask"],
            "labels": batch["input_ids"].masked_fill(batch["completion_mask"] == 0, IGNORE_INDEX),
        }
        total, pairs = objective.train_loss(worker, ours)
        policy, reference, _ = objective.pair_logps(worker, ours)
    metrics = trainer._metrics["train"]
    assert pairs == 4
    assert abs(float(total) / pairs - trl_loss) < 1e-4
    assert abs(trl_loss - math.log(2)) > 1e-2  # policy and reference differ
    assert abs(float(policy[:4].mean()) - metrics["logps/chosen"][-1]) < 1e-4
    assert abs(float(policy[4:].mean()) - metrics["logps/rejected"][-1]) < 1e-4
    rewards = objective.beta * (policy - reference)
    assert abs(float(rewards[:4].mean()) - metrics["rewards/chosen"][-1]) < 1e-4
    assert abs(float(rewards[4:].mean()) - metrics["rewards/rejected"][-1]) < 1e-4


@pytest.mark.parametrize("loss", ["sigmoid", "ipo"])
def test_loss_equals_trl_with_the_adapter_disabled_as_reference(
    loss, tiny_model_dir, tokenizer, tmp_path
):
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    config = LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    trainer, batch = _trl_first_batch(base, loss, tokenizer, tmp_path, peft_config=config)
    # A fresh adapter (B = 0) would make policy == reference; seeded B makes it a real test.
    _seed_lora_b(trainer.model, seed=1)
    spec = validate_spec(spec_dict(dpo={"beta": 0.2, "loss": loss}))
    objective = DpoObjective(spec)
    worker = SimpleNamespace(
        engine=trainer.model, spec=spec, inputs=SimpleNamespace(parent_adapter=None)
    )
    objective.prepare(worker)
    _compare(trainer, batch, objective, worker)


def test_loss_equals_trl_with_a_continued_adapter_as_reference(tiny_model_dir, tokenizer, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    config = LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    parent = get_peft_model(base, config)
    _seed_lora_b(parent, seed=1)
    parent.save_pretrained(tmp_path / "parent")
    ours = copy.deepcopy(parent)
    # TRL copies the adapter it is given into a frozen "ref" adapter.
    trainer, batch = _trl_first_batch(parent, "sigmoid", tokenizer, tmp_path)
    for model in (trainer.model, ours):  # the policy moves away from its parent
        _seed_lora_b(model, seed=2, scale=2.0)
    spec = validate_spec(spec_dict(dpo={"beta": 0.2}))
    objective = DpoObjective(spec)
    parent_adapter = SimpleNamespace(local_dir=lambda: tmp_path / "parent")
    worker = SimpleNamespace(
        engine=ours,
        spec=spec,
        inputs=SimpleNamespace(parent_adapter=parent_adapter),
        device=torch.device("cpu"),
    )
    objective.prepare(worker)
    assert objective.ref_adapter and ours.active_adapter == "default"
    assert all(not p.requires_grad for n, p in ours.named_parameters() if ".ref." in n)
    _compare(trainer, batch, objective, worker)
    assert all(p.requires_grad for n, p in ours.named_parameters() if ".default." in n)


def test_reference_engine_is_sharded_only_under_zero3():
    from rayft.trainers.deepspeed_config import zero_config
    from rayft.trainers.dpo import reference_config

    for stage, want in ((3, 3), (2, 0), (0, 0)):
        spec = validate_spec(
            spec_dict(
                dpo={"weights": "full"},
                deepspeed={"zero_stage": stage, "offload_optimizer": stage > 0},
            )
        )
        policy = zero_config(spec, 2, "float32", on_gpu=False)
        config = reference_config(policy)
        assert config["zero_optimization"]["stage"] == want
        assert "offload_optimizer" not in config["zero_optimization"]
        assert policy["zero_optimization"].get("offload_optimizer") or stage == 0  # not mutated
