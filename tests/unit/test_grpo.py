"""GRPO without Ray: rows, spec errors, and the advantages, log-probs and loss against TRL."""

from __future__ import annotations

import json

import pytest
import torch

from rayft.trainers.config import ConfigError, validate_spec
from rayft.trainers.formats import RowError
from rayft.trainers.grpo import (
    answer_batch,
    collate_prompts,
    group_advantages,
    grpo_loss_sums,
    item_of,
    prompt_of,
    prompt_tokens,
    token_logps,
)
from rayft.trainers.rollout import Sampled

EXACT = {
    "type": "string_check",
    "name": "exact",
    "input": "{{ sample.output_text }}",
    "reference": "{{ item.answer }}",
    "operation": "eq",
}


def spec(**grpo):
    return validate_spec(
        {
            "model": {"name": "tiny-llama"},
            "data": {"train": "t.jsonl", "max_seq_len": 128},
            "objective": "grpo",
            "grpo": {"grader": EXACT, "max_new_tokens": 8, **grpo},
        }
    )


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def test_rows_split_into_prompt_and_item(tokenizer):
    row = {"messages": [{"role": "user", "content": "2+3="}], "answer": "5", "level": 1}
    assert prompt_of(row)[-1]["content"] == "2+3="
    assert item_of(row) == {"answer": "5", "level": 1}
    tokens = prompt_tokens(row, tokenizer, 64)
    assert json.loads(tokens["item"]) == {"answer": "5", "level": 1}
    rendered = tokenizer.decode(tokens["input_ids"])
    assert rendered.endswith("<|im_start|>assistant\n")  # the generation prompt
    cut = prompt_tokens(row, tokenizer, 4)
    assert cut["truncated"] and cut["input_ids"] == tokens["input_ids"][-4:]


@pytest.mark.parametrize(
    ("row", "says"),
    [
        ({"answer": "5"}, "needs 'messages'"),
        (
            {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
            "last message must be the user's",
        ),
        ({"messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
        ({"messages": []}, "non-empty"),
    ],
)
def test_bad_rows_say_what_is_wrong(row, says):
    with pytest.raises(RowError, match=says.replace("[", r"\[").replace("]", r"\]")):
        prompt_of(row)


def test_spec_errors_name_the_key():
    with pytest.raises(ConfigError) as err:
        validate_spec(
            {
                "model": {"name": "tiny-llama"},
                "data": {"train": "t.jsonl", "max_seq_len": 64, "packing": True},
                "objective": "grpo",
                "method": "freeze",
                "grpo": {"max_new_tokens": 64},
            }
        )
    keys = dict(err.value.problems)
    assert set(keys) >= {"grpo.grader", "method", "data.packing", "grpo.max_new_tokens"}
    with pytest.raises(ConfigError) as err:
        spec(grader={**EXACT, "operation": "gt"})
    assert "grpo.grader.operation" in dict(err.value.problems)
    with pytest.raises(ConfigError) as err:
        spec(num_generations=1)
    assert "grpo.num_generations" in dict(err.value.problems)
    judged = {
        "type": "score_model",
        "name": "j",
        "model": "m",
        "input": [{"role": "user", "content": "x"}],
    }
    # A model grader trains too: its judge loads on the grading actor (trainers.judge).
    assert spec(grader=judged).grpo.grader["type"] == "score_model"
    assert spec().optim.lr == 1e-5  # GRPO's own LoRA default
    # vLLM takes a LoRA policy as an adapter, a full one by reloading its weights.
    assert spec(rollout_engine="vllm").grpo.rollout_engine == "vllm"
    full = validate_spec(
        {
            "model": {"name": "tiny-llama"},
            "data": {"train": "t.jsonl", "max_seq_len": 128},
            "objective": "grpo",
            "method": "full",
            "grpo": {"grader": EXACT, "max_new_tokens": 8, "rollout_engine": "vllm", "beta": 0},
        }
    )
    assert full.method == "full" and full.grpo.rollout_engine == "vllm"
    for lora, why in (({"use_dora": True}, "DoRA"), ({"r": 1024}, "ranks up to 512")):
        with pytest.raises(ConfigError) as err:
            validate_spec(
                {
                    "model": {"name": "tiny-llama"},
                    "data": {"train": "t.jsonl", "max_seq_len": 128},
                    "objective": "grpo",
                    "lora": lora,
                    "grpo": {"grader": EXACT, "max_new_tokens": 8, "rollout_engine": "vllm"},
                }
            )
        assert why in dict(err.value.problems)["grpo.rollout_engine"]


def test_vllm_rank_slots_hold_every_rank_up_to_512():
    from rayft.serving.vllm_engine import lora_rank_slot

    assert [lora_rank_slot(r) for r in (1, 2, 8, 9, 16, 17, 64, 300, 512)] == [
        1, 8, 8, 16, 16, 32, 64, 320, 512
    ]  # fmt: skip
    with pytest.raises(ValueError, match="above vLLM's largest"):
        lora_rank_slot(513)


def test_collate_keeps_prompts_items_and_ids():
    import numpy as np

    batch = {
        "input_ids": np.array([np.array([1, 2, 3]), np.array([4, 5])], dtype=object),
        "item": np.array(['{"answer": "5"}', '{"answer": "7"}']),
        "sample_ids": np.array([np.array(["a"]), np.array(["b"])], dtype=object),
        "num_truncated": np.array([0, 1]),
        "num_dropped": np.array([0, 0]),
    }
    out = collate_prompts(batch)
    assert out["prompts"] == [[1, 2, 3], [4, 5]]
    assert out["items"] == [{"answer": "5"}, {"answer": "7"}]
    assert out["sample_ids"] == [["a"], ["b"]] and out["num_truncated"] == 1


def test_answer_batch_labels_only_the_answers():
    answers = [Sampled([7, 8], "x", "stop"), Sampled([9], "y", "length")]
    part = answer_batch([[1, 2, 3]], answers, 2, pad_id=0)
    assert part["input_ids"].tolist() == [[1, 2, 3, 7, 8], [1, 2, 3, 9, 0]]
    assert part["labels"].tolist() == [[-100, -100, -100, 7, 8], [-100, -100, -100, 9, -100]]
    assert part["completion_mask"].tolist() == [[0, 0, 0, 1, 1], [0, 0, 0, 1, 0]]
    assert part["num_label_tokens"] == 3


def test_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0])
    adv, std = group_advantages(rewards, 4, "group")
    first = rewards[:4]
    expected = (first - first.mean()) / (first.std() + 1e-4)
    assert torch.allclose(adv[:4], expected)
    assert torch.all(adv[4:] == 0)  # a group that all scored alike teaches nothing
    adv, _ = group_advantages(rewards, 4, "none")
    assert torch.allclose(adv[:4], first - first.mean())


# --------------------------------------------------------------------------- against TRL

PROMPTS = ["2+3=", "4+1="]
ANSWERS = [["5", "6", "five", "5"], ["5", "3", "5", "no idea at all"]]


def _trl_trainer(model, tokenizer, tmp_path, loss, beta, temperature):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    def reward(completions, answer, **_):
        return [float(c == a) for c, a in zip(completions, answer, strict=True)]

    rows = [{"prompt": p, "answer": a} for p, a in zip(PROMPTS, ["5", "5"], strict=True)]
    args = GRPOConfig(
        output_dir=str(tmp_path / "trl"),
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=8,
        temperature=temperature,
        beta=beta,
        loss_type=loss,
        report_to="none",
        use_cpu=True,
        dataloader_num_workers=0,
        gradient_checkpointing=False,
        logging_steps=1,
    )
    return GRPOTrainer(
        model=model,
        reward_funcs=reward,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )


def _fixed_rollouts(trainer, tokenizer):
    """TRL's generation replaced by fixed answers: both sides score the same batch."""
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    assert len(prompt_ids[0]) == len(prompt_ids[1])  # no left padding on TRL's side
    answers = [
        tokenizer(a, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        for group in ANSWERS
        for a in group
    ]

    def generate(prompts):
        ids = [prompt_ids[i // 4] for i in range(8)]
        texts = [a for group in ANSWERS for a in group]
        return ids, answers, None, texts, None, {}, None, None

    trainer._generate = generate
    return prompt_ids, answers


def _policy(tiny_model_dir):
    """A LoRA policy that differs from its base (random ``lora_B``)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    return model


def _trl_side(trainer, tokenizer):
    """TRL's batch (advantages, reference log-probs), loss and policy log-probs."""
    prompt_ids, answers = _fixed_rollouts(trainer, tokenizer)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by TRL's training step, not run here
    inputs = [{"prompt": PROMPTS[i // 4], "answer": "5"} for i in range(8)]
    with torch.no_grad():
        trl = trainer._generate_and_score_completions(inputs)
        loss = float(trainer._compute_loss(trainer.model, trl))
        trl["full_ids"] = torch.cat([trl["prompt_ids"], trl["completion_ids"]], dim=1)
        trl["full_mask"] = torch.cat([trl["prompt_mask"], trl["completion_mask"]], dim=1)
        logps, *_ = trainer._get_per_token_logps_and_entropies(
            trainer.model, trl["full_ids"], trl["full_mask"], trl["completion_ids"].size(1)
        )
    return prompt_ids, answers, trl, loss, logps


@pytest.mark.parametrize(
    ("loss", "beta", "temperature"),
    [("grpo", 0.0, 1.0), ("bnpo", 0.0, 0.7), ("dr_grpo", 0.0, 1.0), ("dapo", 0.04, 0.9)],
)
def test_loss_advantages_and_logps_equal_trl(
    tiny_model_dir, tokenizer, tmp_path, loss, beta, temperature
):
    model = _policy(tiny_model_dir)
    trainer = _trl_trainer(model, tokenizer, tmp_path, loss, beta, temperature)
    if beta:
        # TRL keeps a pretrained adapter's copy as the reference ("ref"), as rayft does when
        # a run continues a published adapter; the policy then moves away from it.
        assert "ref" in model.peft_config
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_A" in name and ".default." in name:
                    param.mul_(1.5)
    prompt_ids, answers, trl, trl_loss, trl_logps = _trl_side(trainer, tokenizer)

    grpo = spec(loss=loss, beta=beta, temperature=temperature, num_generations=4).grpo
    part = answer_batch(prompt_ids, [Sampled(a, "", "stop") for a in answers], 4, pad_id=0)
    rewards = torch.tensor([float(a == "5") for group in ANSWERS for a in group])
    advantages, _ = group_advantages(rewards, 4, grpo.scale_rewards)
    assert torch.allclose(advantages, trl["advantages"], atol=1e-4)

    head, answer = model.get_output_embeddings(), trl["completion_mask"]
    width = len(prompt_ids[0])  # answer positions start here, as TRL keeps them
    with torch.no_grad():
        logps = token_logps(model, head, part, temperature)
        full = model(input_ids=trl["full_ids"], attention_mask=trl["full_mask"]).logits
        plain = torch.log_softmax(full[:, :-1].float() / temperature, -1)
        plain = plain.gather(-1, trl["full_ids"][:, 1:, None])[..., 0]
        # The log-probs equal the plain softmax over the model's logits; TRL's own tiled
        # fused head (trl.trainer.utils.add_fused_lm_head) departs from that by up to ~4e-3.
        assert torch.allclose(
            logps[:, width - 1 :] * answer, plain[:, width - 1 :] * answer, atol=1e-5
        )
        assert torch.allclose(logps[:, width - 1 :] * answer, trl_logps * answer, atol=1e-2)
        ref = None
        if beta:
            model.set_adapter("ref")
            ref = token_logps(model, head, part, temperature)
            model.set_adapter("default")
            trl_ref = trl["ref_per_token_logps"] * answer
            assert torch.allclose(ref[:, width - 1 :] * answer, trl_ref, atol=1e-2)
            assert not torch.allclose(ref, logps)  # the KL term is not zero
        mask = part["completion_mask"][:, 1:]
        total, count, _ = grpo_loss_sums(logps, None, ref, advantages, mask, grpo)
    assert abs(float(total) / count - trl_loss) < 1e-4
    assert abs(trl_loss) > 1e-3 or beta == 0.0  # a loss that says something


def test_uploads_take_prompt_rows_and_still_refuse_bad_ones(tmp_path):
    from rayft.cluster.files_service import _scan_training_rows
    from rayft.trainers.data import DataError

    prompts = tmp_path / "rft.jsonl"
    row = {"messages": [{"role": "user", "content": "2+3?"}], "answer": "5"}
    prompts.write_text(json.dumps(row) + "\n" + json.dumps(row) + "\n")
    assert _scan_training_rows(prompts).format == "prompt"
    chats = tmp_path / "chat.jsonl"
    turn = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    chats.write_text(json.dumps(turn) + "\n")
    assert _scan_training_rows(chats).format == "chat"
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps(turn) + "\n" + json.dumps({"text": 3}) + "\n")
    with pytest.raises(DataError, match=":2: "):
        _scan_training_rows(broken)


def judged_spec(grader: dict) -> dict:
    return {
        "model": {"name": "tiny-llama"},
        "data": {"train": "prompts.jsonl"},
        "objective": "grpo",
        "grpo": {"grader": grader},
    }


def score_model(model: str, name: str = "judge") -> dict:
    return {
        "type": "score_model",
        "name": name,
        "model": model,
        "input": [{"role": "user", "content": "Is {{ sample.output_text }} right?"}],
    }


def test_every_judge_of_a_grader_is_found_with_its_spec_key():
    from rayft.trainers.graders import judge_keys, parse_grader

    multi = {
        "type": "multi",
        "name": "both",
        "calculate_output": "(first + second) / 2",
        "graders": {"first": score_model("tiny-llama"), "second": score_model("./a-judge")},
    }
    assert judge_keys(parse_grader(multi), "grpo.grader") == [
        ("grpo.grader.graders.first.model", "tiny-llama"),
        ("grpo.grader.graders.second.model", "./a-judge"),
    ]
    alone = {**multi, "calculate_output": "judge", "graders": score_model("tiny-llama")}
    assert judge_keys(parse_grader(alone), "grpo.grader") == [
        ("grpo.grader.graders.model", "tiny-llama")
    ]
    exact = {"type": "string_check", "name": "x", "input": "a", "reference": "a", "operation": "eq"}
    assert judge_keys(parse_grader(exact)) == []


def test_a_judge_that_cannot_load_fails_before_ray_starts_naming_its_key(tmp_path, tiny_model_dir):
    import sys

    import rayft
    from rayft.trainers.manifest import ArtifactManifest
    from rayft.trainers.objectives import objective_class
    from rayft.trainers.rollout import check_judges
    from rayft.trainers.storage import StorageRoot

    root = StorageRoot.resolve(str(tmp_path / "home"))
    spec = validate_spec(judged_spec(score_model("./no-such-judge")))
    with pytest.raises(rayft.ModelError) as caught:
        check_judges(objective_class(spec).judges(spec), root)
    message = str(caught.value)
    assert message.startswith("grpo.grader.model: ") and "no-such-judge" in message
    assert "does not exist" in message

    # An adapter whose manifest names no base: the judge could not know what to load.
    orphan = root.adapters / "orphan-judge"
    orphan.mkdir(parents=True)
    (orphan / "adapter_config.json").write_text("{}")
    ArtifactManifest(kind="adapter").write(orphan)
    spec = validate_spec(judged_spec(score_model("orphan-judge")))
    with pytest.raises(rayft.ModelError, match="grpo.grader.model: judge 'orphan-judge'"):
        check_judges(objective_class(spec).judges(spec), root)

    # A builtin judge loads: nothing is raised.
    spec = validate_spec(judged_spec(score_model("tiny-llama")))
    check_judges(objective_class(spec).judges(spec), root)

    # Through the Python API the same error comes before any Ray work.
    rows = tmp_path / "prompts.jsonl"
    rows.write_text(
        "".join(
            json.dumps({"messages": [{"role": "user", "content": f"2+{b}?"}], "answer": str(2 + b)})
            + "\n"
            for b in range(4)
        )
    )
    data = judged_spec(score_model("./no-such-judge"))
    data["data"]["train"] = str(rows)
    with pytest.raises(rayft.ModelError, match="grpo.grader.model"):
        rayft.train(data, storage=str(tmp_path / "home"))
    # And from a sweep, before its first trial.
    data["data"]["eval"] = str(rows)
    data["tune"] = {"search_space": {"grpo.temperature": {"grid": [0.7, 1.0]}}}
    data["eval"] = {"every_steps": 2}
    data["optim"] = {"max_steps": 2}
    with pytest.raises(rayft.ModelError, match="grpo.grader.model"):
        rayft.tune({**data, "storage": str(tmp_path / "home")})
    ray = sys.modules.get("ray")
    assert ray is None or not ray.is_initialized()


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_shared_prompt_rows_give_each_answers_own_row_logps_and_gradients(
    tiny_model_dir, temperature
):
    # Prompts of different lengths, answers of different lengths (one a single token), so
    # the shared rows are padded and every answer starts at a different offset.
    from rayft.trainers.grpo import shared_prompt_rows

    model = _policy(tiny_model_dir)
    head = model.get_output_embeddings()
    prompts = [[5, 17, 42, 99, 120], [7, 3, 88]]
    tokens = [[11, 12, 13], [14], [15, 16, 17, 18, 19], [20, 21], [30], [31, 32], [33], [40]]
    answers = [Sampled(t, "", "stop") for t in tokens]
    part = answer_batch(prompts, answers, 4, pad_id=0)
    shared = shared_prompt_rows(prompts, answers, 4, 0, part["input_ids"].shape[1])
    assert shared is not None
    # Each prompt once: 5 + 11 and 3 + 5 tokens against 8 rows of prompt + answer.
    assert shared["shared_input_ids"].shape == (2, 16)
    assert int((shared["shared_attention_mask"] == 0).sum()) > 0

    def logps_and_grads(batch):
        model.zero_grad(set_to_none=True)
        logps = token_logps(model, head, batch, temperature)
        weights = torch.linspace(0.5, 1.5, logps.numel()).view_as(logps)
        (logps * weights * part["completion_mask"][:, 1:]).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return logps.detach(), grads

    want, want_grads = logps_and_grads(part)
    got, got_grads = logps_and_grads({**part, **shared})
    mask = part["completion_mask"][:, 1:].bool()
    assert torch.allclose(got[mask], want[mask], atol=1e-5)
    assert torch.count_nonzero(got[~mask]) == 0
    assert got_grads.keys() == want_grads.keys() and len(got_grads) > 0
    for name, grad in want_grads.items():
        assert torch.allclose(got_grads[name], grad, atol=1e-5, rtol=1e-4), name


def test_shared_prompt_rows_step_aside_for_groups_over_the_limit():
    from rayft.trainers.grpo import SHARED_ROW_LIMIT, shared_prompt_rows

    long = [Sampled(list(range(3, 3 + SHARED_ROW_LIMIT // 2)), "", "length")] * 2
    assert shared_prompt_rows([[1, 2]], long, 2, 0, SHARED_ROW_LIMIT) is None
    assert spec().grpo.share_prompt is True
    assert spec(share_prompt=False).grpo.share_prompt is False
