"""The training loss matches Hugging Face's causal-LM loss exactly."""

import torch

from rayft.trainers.loop import token_loss_sums


def test_token_loss_sums_equals_hf_shifted_mean():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=50,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    ).eval()
    ids = torch.randint(0, 50, (2, 9))
    labels = ids.clone()
    labels[0, :4] = -100
    labels[1, 6:] = -100
    with torch.no_grad():
        out = model(input_ids=ids, labels=labels)
    total, count = token_loss_sums(out.logits, labels)
    assert count == (labels[:, 1:] != -100).sum().item() == 5 + 5
    torch.testing.assert_close(total / count, out.loss, rtol=1e-6, atol=1e-6)


def test_unlabelled_batch_has_zero_loss():
    logits = torch.randn(1, 3, 7)
    total, count = token_loss_sums(logits, torch.full((1, 3), -100))
    assert count == 0 and float(total) == 0.0
