"""Format detection, row checks and tokenization with loss masks (no Ray)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest

from rayft.trainers.formats import (
    IGNORE_INDEX,
    ChatTemplateError,
    RowError,
    check_row,
    detect_format,
    to_messages,
    tokenize_example,
)

CHAT = {
    "messages": [
        {"role": "system", "content": "you are helpful"},
        {"role": "user", "content": "capital of france"},
        {"role": "assistant", "content": "paris"},
        {"role": "user", "content": "and japan"},
        {"role": "assistant", "content": [{"type": "text", "text": "tokyo"}]},
    ]
}


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def plain_tokenizer(tokenizer: Any) -> Any:
    """The same tokenizer without a chat template."""
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    return plain


def labelled(example: dict[str, Any]) -> list[int]:
    return [
        t for t, label in zip(example["input_ids"], example["labels"], strict=True) if label != -100
    ]


@pytest.mark.parametrize(
    ("row", "fmt"),
    [
        (CHAT, "chat"),
        ({"prompt": "a", "completion": "b"}, "prompt_completion"),
        ({"instruction": "a", "input": "", "output": "b"}, "alpaca"),
        ({"instruction": "a", "output": "b"}, "alpaca"),
        ({"text": "hello"}, "text"),
        ({"text": "x", "messages": CHAT["messages"]}, "chat"),
        ({"prompt": "a", "completion": "b", "text": None}, "prompt_completion"),
    ],
)
def test_detect_format(row: dict[str, Any], fmt: str) -> None:
    assert detect_format(row) == fmt


def test_detect_format_rejects_unknown_rows() -> None:
    with pytest.raises(RowError, match="fits no known format.*question"):
        detect_format({"question": "a", "answer": "b"})
    with pytest.raises(RowError, match="JSON object"):
        detect_format(["not", "a", "dict"])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("row", "fmt", "message"),
    [
        ({"prompt": "a"}, "prompt_completion", "missing field 'completion'"),
        ({"prompt": "a", "completion": 3}, "prompt_completion", "'completion' must be a string"),
        ({"instruction": "a"}, "alpaca", "missing field 'output'"),
        ({"instruction": "a", "input": 1, "output": "b"}, "alpaca", "'input' must be a string"),
        ({"text": ""}, "text", "'text' is empty"),
        ({"messages": []}, "chat", "empty messages"),
        ({"messages": "hi"}, "chat", "'messages' must be a list"),
        (
            {"messages": [{"role": "user", "content": "a"}]},
            "chat",
            "messages has no assistant turn",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "a"},
                    {"role": "assistant", "content": "b"},
                    {"role": "bot", "content": "c"},
                ]
            },
            "chat",
            r"messages\[2\]\.role must be one of system/user/assistant/tool",
        ),
        (
            {"messages": [{"role": "user"}, {"role": "assistant", "content": "b"}]},
            "chat",
            r"messages\[0\]\.content is missing",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {}}]},
                    {"role": "assistant", "content": "b"},
                ]
            },
            "chat",
            r"messages\[0\]\.content\[0\]\.type is 'image_url'",
        ),
    ],
)
def test_check_row_names_the_field(row: dict[str, Any], fmt: str, message: str) -> None:
    with pytest.raises(RowError, match=message):
        check_row(row, fmt)


def test_check_row_accepts_valid_rows() -> None:
    check_row(CHAT, "chat")
    check_row({"prompt": "a", "completion": "b"}, "prompt_completion")
    check_row({"instruction": "a", "output": "b"}, "alpaca")
    check_row({"text": "a"}, "text")
    tool_call = {"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]}
    check_row({"messages": [{"role": "user", "content": "a"}, tool_call]}, "chat")


def test_to_messages() -> None:
    parts = {
        "messages": [
            {"role": "user", "content": [{"type": "text", "text": "a"}, {"text": "b"}]},
            {"role": "assistant", "content": "c"},
        ]
    }
    assert to_messages(parts, "chat")[0] == {"role": "user", "content": "a\nb"}
    assert to_messages({"instruction": "do", "input": "this", "output": "ok"}, "alpaca") == [
        {"role": "user", "content": "do\n\nthis"},
        {"role": "assistant", "content": "ok"},
    ]
    assert to_messages({"instruction": "do", "input": "", "output": "ok"}, "alpaca")[0] == {
        "role": "user",
        "content": "do",
    }
    assert to_messages({"prompt": "p", "completion": "c"}, "prompt_completion") == [
        {"role": "user", "content": "p"},
        {"role": "assistant", "content": "c"},
    ]
    assert to_messages({"text": "t"}, "text") is None


def test_chat_labels_only_assistant_turns_and_end_token(tokenizer: Any) -> None:
    example = tokenize_example(CHAT, "chat", tokenizer, 512, train_on_prompt=False)
    assert example is not None
    expected = tokenizer.apply_chat_template(to_messages(CHAT, "chat"), tokenize=False)
    assert tokenizer.decode(example["input_ids"]) == expected
    assert len(example["labels"]) == len(example["input_ids"])
    assert example["truncated"] is False
    # Labelled tokens are exactly the two assistant contents, each with its <|im_end|>;
    # the newline after <|im_end|> is masked.
    assert tokenizer.decode(labelled(example)) == "paris<|im_end|>tokyo<|im_end|>"
    # Every token of the system/user turns and of the generation prompts is masked.
    prompt = tokenizer.apply_chat_template(
        to_messages(CHAT, "chat")[:2], tokenize=False, add_generation_prompt=True
    )
    n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert example["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert example["labels"][-1] == IGNORE_INDEX  # the trailing "\n"


def test_train_on_prompt_labels_everything(tokenizer: Any) -> None:
    example = tokenize_example(CHAT, "chat", tokenizer, 512, train_on_prompt=True)
    assert example is not None
    assert example["labels"] == example["input_ids"]


def test_prompt_completion_and_alpaca_use_the_chat_template(tokenizer: Any) -> None:
    pc = tokenize_example(
        {"prompt": "hello", "completion": "world"}, "prompt_completion", tokenizer, 512
    )
    assert pc is not None
    assert tokenizer.decode(pc["input_ids"]).startswith("<|im_start|>user\nhello<|im_end|>")
    assert tokenizer.decode(labelled(pc)) == "world<|im_end|>"
    alpaca = {"instruction": "name a city", "input": "in france", "output": "paris"}
    ex = tokenize_example(alpaca, "alpaca", tokenizer, 512)
    assert ex is not None
    assert "name a city\n\nin france" in tokenizer.decode(ex["input_ids"])
    assert tokenizer.decode(labelled(ex)) == "paris<|im_end|>"


def test_prompt_completion_without_chat_template(plain_tokenizer: Any) -> None:
    tok = plain_tokenizer
    ex = tokenize_example(
        {"prompt": "hello", "completion": " world"}, "prompt_completion", tok, 512
    )
    assert ex is not None
    n_prompt = len(tok("hello")["input_ids"])
    assert ex["labels"][:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert ex["input_ids"][-1] == tok.eos_token_id
    assert tok.decode(labelled(ex)) == " world" + tok.eos_token
    alpaca = tokenize_example({"instruction": "do it", "output": "done"}, "alpaca", tok, 512)
    assert alpaca is not None
    assert "### Instruction:\ndo it" in tok.decode(alpaca["input_ids"])
    assert tok.decode(labelled(alpaca)) == "done" + tok.eos_token
    with pytest.raises(ChatTemplateError, match="chat template"):
        tokenize_example(CHAT, "chat", tok, 512)


def test_text_labels_every_token_and_ends_with_eos(tokenizer: Any) -> None:
    ex = tokenize_example({"text": "the quick brown fox"}, "text", tokenizer, 512)
    assert ex is not None
    assert ex["labels"] == ex["input_ids"]
    assert ex["input_ids"][-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ex["input_ids"]) == "the quick brown fox" + tokenizer.eos_token


def test_truncation_and_dropping(tokenizer: Any) -> None:
    ex = tokenize_example(
        {"text": "the quick brown fox jumps over a lazy dog"}, "text", tokenizer, 4
    )
    assert ex is not None
    assert ex["truncated"] is True
    assert len(ex["input_ids"]) == len(ex["labels"]) == 4
    # The prompt alone fills max_seq_len: no target token is left, the row is dropped.
    long_prompt = {
        "prompt": "the quick brown fox jumps over a lazy dog " * 4,
        "completion": "paris",
    }
    assert tokenize_example(long_prompt, "prompt_completion", tokenizer, 16) is None
    assert (
        tokenize_example(long_prompt, "prompt_completion", tokenizer, 16, train_on_prompt=True)
        is not None
    )


def test_template_that_rewrites_past_turns_is_an_error(tokenizer: Any) -> None:
    rewriting = copy.deepcopy(tokenizer)
    # Like templates that strip reasoning from earlier assistant turns.
    rewriting.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' and not loop.last %}"
        "{{ '<|im_start|>assistant\n[earlier]<|im_end|>\n' }}{% else %}"
        "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
        "{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    with pytest.raises(ChatTemplateError, match="not a prefix"):
        tokenize_example(CHAT, "chat", rewriting, 512)
