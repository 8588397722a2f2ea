"""The training loss matches Hugging Face's causal-LM loss exactly, without full logits."""

from __future__ import annotations

import math

import pytest
import torch

from rayft.trainers.loss import (
    IGNORE_INDEX,
    causal_lm_loss_sums,
    head_loss_sums,
    perplexity,
    token_loss_sums,
)
from rayft.trainers.packing import block_causal_mask


def small_llama(seed: int = 0, tied: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=50,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            tie_word_embeddings=tied,
        )
    )


def rows() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, 50, (2, 9), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, :4] = IGNORE_INDEX
    labels[1, 6:] = IGNORE_INDEX
    return ids, labels


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_token_loss_sums_equals_hf_shifted_mean():
    model = small_llama().eval()
    ids, labels = rows()
    with torch.no_grad():
        out = model(input_ids=ids, labels=labels)
    total, count = token_loss_sums(out.logits, labels)
    assert count == (labels[:, 1:] != IGNORE_INDEX).sum().item() == 5 + 5
    torch.testing.assert_close(total / count, out.loss, rtol=1e-6, atol=1e-6)


def test_unlabelled_batch_has_zero_loss():
    logits = torch.randn(1, 3, 7)
    total, count = token_loss_sums(logits, torch.full((1, 3), IGNORE_INDEX))
    assert count == 0 and float(total) == 0.0
    hidden = torch.randn(1, 3, 4, requires_grad=True)
    total, count = head_loss_sums(torch.nn.Linear(4, 7), hidden, torch.full((1, 3), IGNORE_INDEX))
    assert count == 0 and float(total.detach()) == 0.0
    total.backward()  # still differentiable: every worker runs the same backward
    assert hidden.grad is not None and float(hidden.grad.abs().sum()) == 0.0


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("chunk", [1, 3, 1024])
def test_lean_loss_equals_hf_loss_in_value_and_gradients(tied, chunk):
    ids, labels = rows()
    reference = small_llama(tied=tied).train()
    out = reference(input_ids=ids, labels=labels)
    out.loss.backward()
    want = grads(reference)

    lean = small_llama(tied=tied).train()
    total, count = causal_lm_loss_sums(
        lean, lean.get_output_embeddings(), {"input_ids": ids, "labels": labels}, chunk
    )
    (total / count).backward()
    got = grads(lean)

    torch.testing.assert_close(total / count, out.loss, rtol=1e-5, atol=1e-5)
    # Full logits, cross_entropy directly: the same number again.
    with torch.no_grad():
        full = torch.nn.functional.cross_entropy(
            out.logits[:, :-1].reshape(-1, 50), labels[:, 1:].reshape(-1), reduction="sum"
        )
    torch.testing.assert_close(total.detach(), full, rtol=1e-5, atol=1e-5)
    assert got.keys() == want.keys()
    assert tied or "lm_head.weight" in got
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-5, msg=name)


def test_lean_loss_under_peft_lora_and_a_packing_mask():
    from peft import LoraConfig, get_peft_model

    def lora_model():
        model = get_peft_model(
            small_llama(),
            LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"),
        )
        for name, param in model.named_parameters():
            if "lora_B" in name:  # non-zero B, so the adapter changes the output
                torch.nn.init.normal_(param, std=0.3, generator=torch.Generator().manual_seed(3))
        return model.train()

    ids, labels = rows()
    segments = torch.tensor([[1, 1, 1, 1, 2, 2, 2, 2, 0], [1, 1, 1, 2, 2, 2, 2, 2, 2]])
    labels[0, 4] = labels[1, 3] = IGNORE_INDEX  # no label across a sample boundary
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3, 0], [0, 1, 2, 0, 1, 2, 3, 4, 5]])
    batch = {
        "input_ids": ids,
        "labels": labels,
        "attention_mask": block_causal_mask(segments, torch.float32),
        "position_ids": positions,
    }
    reference = lora_model()
    out = reference(**{k: v for k, v in batch.items()})
    out.loss.backward()
    lean = lora_model()
    total, count = causal_lm_loss_sums(lean, lean.get_output_embeddings(), batch, 2)
    (total / count).backward()
    torch.testing.assert_close(total / count, out.loss, rtol=1e-5, atol=1e-5)
    want, got = grads(reference), grads(lean)
    assert want and got.keys() == want.keys()
    assert all("lora_" in name for name in got)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-5, msg=name)


def test_lean_loss_never_builds_full_vocabulary_logits():
    """The head only ever sees labelled positions, at most a chunk at a time."""
    model = small_llama().train()
    ids, labels = rows()
    seen: list[tuple[int, ...]] = []
    head = model.get_output_embeddings()
    hook = head.register_forward_hook(lambda m, args, out: seen.append(tuple(out.shape)))
    try:
        total, count = causal_lm_loss_sums(model, head, {"input_ids": ids, "labels": labels}, 4)
        total.backward()
    finally:
        hook.remove()
    # [2, 1, 50] inside the model (last position only), then chunks of 4, 4, 2 positions
    # (recomputed once more in backward).
    assert seen[0] == (2, 1, 50)
    assert sorted(seen[1:]) == sorted([(4, 50), (4, 50), (2, 50)] * 2)
    assert count == 10


def test_perplexity_is_exp_loss_capped_and_keeps_nan():
    assert perplexity(1.5) == pytest.approx(math.exp(1.5))
    assert perplexity(500.0) == math.exp(50.0)
    assert math.isnan(perplexity(float("nan")))


def test_training_loss_and_serving_score_agree_on_the_same_rows(rayft_home):
    """``POST /v1/evaluations`` (``ModelEngine.score``) and training share one loss."""
    from transformers import AutoModelForCausalLM

    from rayft.serving.engine import ModelEngine
    from rayft.trainers.models import resolve_model

    engine = ModelEngine("tiny-llama", storage=str(rayft_home), dtype="float32")
    model_dir = resolve_model("tiny-llama", rayft_home / "models")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    generator = torch.Generator().manual_seed(7)
    examples = []
    for length in (5, 9, 12, 3):
        row = torch.randint(3, 200, (length,), generator=generator).tolist()
        examples.append((row, [IGNORE_INDEX] * (length // 2) + row[length // 2 :]))
    served_total, served_count = engine.score(examples, batch_size=len(examples))

    # The training loop's path: right-padded batch, labels IGNORE_INDEX on padding.
    width = max(len(ids) for ids, _ in examples)
    ids = torch.full((len(examples), width), engine.pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for i, (row, row_labels) in enumerate(examples):
        ids[i, : len(row)] = torch.tensor(row)
        labels[i, : len(row)] = torch.tensor(row_labels)
        mask[i, : len(row)] = 1
    batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
    with torch.no_grad():
        total, count = causal_lm_loss_sums(model, model.get_output_embeddings(), batch)
    assert served_count == count == sum(len(r) - len(r) // 2 for r, _ in examples)
    assert served_total == pytest.approx(float(total), abs=1e-6)
    # And the mean loss equals Hugging Face's own for the same rows.
    with torch.no_grad():
        hf_loss = float(model(**batch).loss)
    assert served_total / served_count == pytest.approx(hf_loss, abs=1e-6)
