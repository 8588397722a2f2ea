"""Training-row formats: detection, validation and tokenization with loss masks.

Four row formats are understood, each as a JSON object:

* ``chat``: ``{"messages": [{"role": ..., "content": ...}, ...]}`` as OpenAI writes
  them; ``content`` may also be a list of ``{"type": "text", "text": ...}`` parts.
* ``prompt_completion``: ``{"prompt": ..., "completion": ...}``.
* ``alpaca``: ``{"instruction": ..., "input": ... (optional), "output": ...}``.
* ``text``: ``{"text": ...}`` (plain language-model text, every token is a target).
* ``preference`` (``method: dpo``): a prompt with a chosen and a rejected answer, as TRL
  writes them (``{"prompt", "chosen", "rejected"}`` as strings or as message lists, or
  ``{"chosen", "rejected"}`` conversations sharing their prompt turns) or as OpenAI's DPO
  JSONL (``{"input": {"messages"}, "preferred_output", "non_preferred_output"}``).

Everything here is a pure function of the row and the tokenizer, so it is unit
tested without Ray and runs unchanged inside Ray Data tasks.
"""

from __future__ import annotations

from typing import Any

# Defined here, not in trainers.loss, so that the formats (and the objectives' checks built
# on them) import without torch; trainers.loss takes it from here.
IGNORE_INDEX = -100
"""Label of a position that carries no loss (prompt tokens, padding, packed-sample starts)."""

FORMATS = ("chat", "prompt_completion", "alpaca", "text", "preference")
ROLES = ("system", "user", "assistant", "tool")

# Alpaca's own prompt (Taori et al., 2023), used only for tokenizers without a chat template.
ALPACA_PROMPT = (
    "Below is an instruction that describes a task{extra}. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n{input_block}### Response:\n"
)

# Tokens that close a turn in common chat templates. Labels stop at the last of these
# inside an assistant turn: the model learns to emit it (and so to stop), while the
# template's trailing separator after it (ChatML's "\n") is masked, because generation
# ends at the end-of-turn token and never produces that separator.
END_OF_TURN_TOKENS = (
    "<|im_end|>",
    "<|eot_id|>",
    "<|end|>",
    "<end_of_turn>",
    "<|end_of_text|>",
    "<|endoftext|>",
    "</s>",
)


class RowError(Exception):
    """A training row that does not fit its format; the message names the field."""


class ChatTemplateError(ValueError):
    """A chat template whose rendering of a conversation prefix is not a prefix of the
    rendering of the whole conversation, so assistant tokens cannot be located."""


def _present(row: dict[str, Any], key: str) -> bool:
    # Columnar sources (parquet, csv, HF datasets) fill absent fields with null.
    return row.get(key) is not None


def detect_format(row: dict[str, Any]) -> str:
    """Name the format a row is written in.

    Args:
        row: One training row as a JSON object.

    Returns:
        One of ``"chat"``, ``"prompt_completion"``, ``"alpaca"``, ``"text"``, checked in
        that order (a row with both ``messages`` and ``text`` is chat).

    Raises:
        RowError: The row has none of the fields that identify a format.
    """
    if not isinstance(row, dict):
        raise RowError(f"a row must be a JSON object, got {type(row).__name__}")
    if is_preference_row(row):
        return "preference"
    if _present(row, "messages"):
        return "chat"
    if _present(row, "prompt") and _present(row, "completion"):
        return "prompt_completion"
    if _present(row, "instruction") and _present(row, "output"):
        return "alpaca"
    if _present(row, "text"):
        return "text"
    keys = ", ".join(sorted(row)) or "none"
    raise RowError(
        "row fits no known format (fields: "
        f"{keys}); expected 'messages' (chat), 'prompt'+'completion', "
        "'instruction'+'output' (alpaca), 'text', or 'chosen'+'rejected' (preference)"
    )


def _content_text(content: Any, where: str) -> str:
    """The text of an OpenAI message content: a string or a list of text parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict):
                raise RowError(f"{where}[{j}] must be an object like {{'type': 'text', ...}}")
            if part.get("type", "text") != "text":
                raise RowError(
                    f"{where}[{j}].type is {part.get('type')!r}: only text parts are supported"
                )
            if not isinstance(part.get("text"), str):
                raise RowError(f"{where}[{j}].text must be a string")
            texts.append(part["text"])
        # Parts are separate pieces of one message; a newline keeps words from fusing.
        return "\n".join(texts)
    raise RowError(f"{where} must be a string or a list of text parts")


def _check_string(row: dict[str, Any], key: str, required: bool = True) -> None:
    if not _present(row, key):
        if required:
            raise RowError(f"missing field {key!r}")
        return
    if not isinstance(row[key], str):
        raise RowError(f"field {key!r} must be a string, got {type(row[key]).__name__}")


def check_row(row: dict[str, Any], fmt: str) -> None:
    """Validate a row against a format.

    Args:
        row: One training row as a JSON object.
        fmt: One of ``FORMATS``.

    Raises:
        RowError: Naming the missing or ill-typed field, e.g. ``missing field
            'completion'`` or ``messages[2].role must be one of system/user/assistant/tool``.
    """
    if not isinstance(row, dict):
        raise RowError(f"a row must be a JSON object, got {type(row).__name__}")
    if fmt == "chat":
        _check_messages(row)
    elif fmt == "prompt_completion":
        _check_string(row, "prompt")
        _check_string(row, "completion")
    elif fmt == "alpaca":
        _check_string(row, "instruction")
        _check_string(row, "input", required=False)
        _check_string(row, "output")
    elif fmt == "text":
        _check_string(row, "text")
        if not row["text"]:
            raise RowError("field 'text' is empty")
    elif fmt == "preference":
        preference_pair(row)
    else:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")


def _check_messages(row: dict[str, Any]) -> None:
    if not _present(row, "messages"):
        raise RowError("missing field 'messages'")
    messages = row["messages"]
    if not isinstance(messages, list):
        raise RowError(f"field 'messages' must be a list, got {type(messages).__name__}")
    if not messages:
        raise RowError("empty messages")
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise RowError(f"{where} must be an object with 'role' and 'content'")
        if message.get("role") not in ROLES:
            raise RowError(f"{where}.role must be one of {'/'.join(ROLES)}")
        content = message.get("content")
        if content is None:
            # OpenAI assistant turns that only call tools carry no content.
            if message.get("tool_calls"):
                continue
            raise RowError(f"{where}.content is missing")
        _content_text(content, f"{where}.content")
    if not any(m["role"] == "assistant" for m in messages):
        raise RowError("messages has no assistant turn")


def _normalise_message(message: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in message.items() if v is not None}
    if "content" in out:
        out["content"] = _content_text(out["content"], "content")
    return out


def to_messages(row: dict[str, Any], fmt: str) -> list[dict[str, Any]] | None:
    """Chat turns for a row, for tokenizers that have a chat template.

    Args:
        row: A row already accepted by ``check_row(row, fmt)``.
        fmt: The row's format.

    Returns:
        The conversation with string contents (text parts joined with newlines);
        prompt_completion becomes ``[user: prompt, assistant: completion]`` and alpaca
        ``[user: instruction + "\\n\\n" + input, assistant: output]``. ``None`` for text.
    """
    if fmt == "chat":
        return [_normalise_message(m) for m in row["messages"]]
    if fmt == "prompt_completion":
        return [
            {"role": "user", "content": row["prompt"]},
            {"role": "assistant", "content": row["completion"]},
        ]
    if fmt == "alpaca":
        user = row["instruction"]
        if row.get("input"):
            user = f"{user}\n\n{row['input']}"
        return [
            {"role": "user", "content": user},
            {"role": "assistant", "content": row["output"]},
        ]
    if fmt == "text":
        return None
    raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")


def end_of_turn_ids(tokenizer: Any) -> set[int]:
    """Token ids that close a turn for this tokenizer (its EOS and known end-of-turn tokens)."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    special = set(getattr(tokenizer, "all_special_tokens", []) or [])
    special |= set(getattr(tokenizer, "added_tokens_encoder", {}) or {})
    # One id at a time: get_vocab() copies the whole vocabulary, once per row.
    for token in END_OF_TURN_TOKENS:
        if token in special:
            token_id = tokenizer.convert_tokens_to_ids(token)
            if token_id is not None and token_id != tokenizer.unk_token_id:
                ids.add(int(token_id))
    return ids


def _encode(tokenizer: Any, text: str, add_special_tokens: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"])


def _render(tokenizer: Any, messages: list[dict[str, Any]], generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt
    )


def _chat_tokens(
    messages: list[dict[str, Any]], tokenizer: Any, train_on_prompt: bool
) -> tuple[list[int], list[int]]:
    """Token ids and labels of a conversation rendered by the tokenizer's chat template.

    The rendering is cut into pieces at every assistant turn: the text up to
    ``render(messages[:i], add_generation_prompt=True)`` is prompt, the text from there
    up to ``render(messages[:i+1])`` is turn ``i``'s target. Each piece is tokenized on
    its own (as ``apply_chat_template`` does, without extra special tokens), so a piece
    boundary is always a token boundary and no token straddles prompt and target.
    """
    end_ids = end_of_turn_ids(tokenizer)
    full = _render(tokenizer, messages, generation_prompt=False)
    pieces: list[tuple[str, bool]] = []  # (text, is_target)
    cursor = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = _render(tokenizer, messages[:i], generation_prompt=True) if i else ""
        upto = _render(tokenizer, messages[: i + 1], generation_prompt=False)
        # Each boundary must fall inside the full rendering, in order; a template that
        # renders earlier turns differently once later turns exist breaks this.
        for name, text, start in (
            (f"messages[:{i}] with a generation prompt", prompt, cursor),
            (f"messages[:{i + 1}]", upto, len(prompt)),
        ):
            if len(text) < start or not full.startswith(text):
                raise ChatTemplateError(
                    f"the chat template renders {name} as text that is not a prefix of the "
                    "whole conversation, so the assistant tokens of this row cannot be "
                    "located; use a template whose earlier turns render the same in every "
                    "prefix (templates that rewrite past turns, e.g. by dropping reasoning, "
                    "break this), or split multi-turn rows into one row per assistant turn"
                )
        pieces.append((full[cursor : len(prompt)], False))
        pieces.append((full[len(prompt) : len(upto)], True))
        cursor = len(upto)
    pieces.append((full[cursor:], False))

    input_ids: list[int] = []
    labels: list[int] = []
    for text, is_target in pieces:
        if not text:
            continue
        ids = _encode(tokenizer, text, add_special_tokens=False)
        if is_target and not train_on_prompt:
            ends = [k for k, t in enumerate(ids) if t in end_ids]
            stop = ends[-1] + 1 if ends else len(ids)
            piece_labels = ids[:stop] + [IGNORE_INDEX] * (len(ids) - stop)
        elif is_target or train_on_prompt:
            piece_labels = list(ids)
        else:
            piece_labels = [IGNORE_INDEX] * len(ids)
        input_ids += ids
        labels += piece_labels
    return input_ids, labels


def _with_eos(tokenizer: Any, ids: list[int]) -> list[int]:
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids = ids + [int(eos)]
    return ids


def plain_prompt(row: dict[str, Any], fmt: str) -> tuple[str, str] | None:
    """Prompt text and answer of a row, for tokenizers without a chat template.

    Training labels the answer after this prompt, and evaluation generates from the
    same prompt, so both build it here.

    Args:
        row: A row accepted by ``check_row(row, fmt)``.
        fmt: The row's format.

    Returns:
        ``(prompt, answer)``: prompt_completion rows as written, alpaca rows in Alpaca's
        own prompt (with the input block only when ``input`` is non-empty); ``None``
        for chat and text rows, which have no template-free prompt.
    """
    if fmt == "prompt_completion":
        return row["prompt"], row["completion"]
    if fmt == "alpaca":
        has_input = bool(row.get("input"))
        prompt = ALPACA_PROMPT.format(
            extra=", paired with an input that provides further context" if has_input else "",
            instruction=row["instruction"],
            input_block=f"### Input:\n{row['input']}\n\n" if has_input else "",
        )
        return prompt, row["output"]
    return None


def _plain_tokens(
    row: dict[str, Any], fmt: str, tokenizer: Any, train_on_prompt: bool
) -> tuple[list[int], list[int]]:
    """Tokens without a chat template: prompt then completion + EOS, or text + EOS."""
    if fmt == "text":
        ids = _with_eos(tokenizer, _encode(tokenizer, row["text"], add_special_tokens=True))
        return ids, list(ids)
    split = plain_prompt(row, fmt)
    if split is None:  # chat rows need a template: there is no neutral way to join roles.
        raise ChatTemplateError(
            "chat rows need a tokenizer with a chat template; this tokenizer has none "
            "(set tokenizer.chat_template or use data.format=prompt_completion/text)"
        )
    prompt, completion = split
    prompt_ids = _encode(tokenizer, prompt, add_special_tokens=True)
    completion_ids = _with_eos(tokenizer, _encode(tokenizer, completion, add_special_tokens=False))
    prompt_labels = list(prompt_ids) if train_on_prompt else [IGNORE_INDEX] * len(prompt_ids)
    return prompt_ids + completion_ids, prompt_labels + completion_ids


def tokenize_example(
    row: dict[str, Any],
    fmt: str,
    tokenizer: Any,
    max_seq_len: int,
    train_on_prompt: bool = False,
) -> dict[str, Any] | None:
    """Tokenize one row into model inputs and loss labels.

    Chat-style rows (and prompt_completion/alpaca rows when the tokenizer has a chat
    template) go through the chat template; only assistant content is labelled, up to
    and including the end-of-turn token (e.g. ``<|im_end|>``); the template's separator
    after that token is masked. Without a chat template prompt_completion/alpaca rows
    are prompt tokens followed by completion tokens + EOS. Text rows are text + EOS with
    every token labelled.

    Args:
        row: A row accepted by ``check_row(row, fmt)``.
        fmt: The row's format.
        tokenizer: A Hugging Face tokenizer.
        max_seq_len: Longest sequence kept; longer ones are cut from the right.
        train_on_prompt: Label prompt/user/system tokens too.

    Returns:
        ``{"input_ids": list[int], "labels": list[int], "truncated": bool}`` with
        ``labels`` equal in length to ``input_ids`` and ``-100`` on unlabelled tokens,
        or ``None`` when no labelled token is left that the model predicts (labels
        after position 0 are all ``-100``, e.g. because truncation cut every target);
        the caller counts such rows as dropped.

    Raises:
        ChatTemplateError: The chat template cannot locate assistant tokens.
    """
    messages = to_messages(row, fmt) if getattr(tokenizer, "chat_template", None) else None
    if messages is not None:
        input_ids, labels = _chat_tokens(messages, tokenizer, train_on_prompt)
    else:
        input_ids, labels = _plain_tokens(row, fmt, tokenizer, train_on_prompt)
    truncated = len(input_ids) > max_seq_len
    if truncated:
        input_ids, labels = input_ids[:max_seq_len], labels[:max_seq_len]
    # Causal LMs predict labels[t] from positions < t, so labels[0] is never a target.
    if all(label == IGNORE_INDEX for label in labels[1:]):
        return None
    return {"input_ids": input_ids, "labels": labels, "truncated": truncated}


# ---------------------------------------------------------------- preference pairs

PREFERENCE_FIELDS = (
    "prompt",
    "chosen",
    "rejected",
    "input",
    "preferred_output",
    "non_preferred_output",
)
"""Fields a preference row may carry (TRL's and OpenAI's DPO shapes)."""


def is_preference_row(row: dict[str, Any]) -> bool:
    """Whether a row holds a preference pair (TRL's ``chosen``/``rejected`` or OpenAI's
    ``preferred_output``/``non_preferred_output``)."""
    return (_present(row, "chosen") and _present(row, "rejected")) or (
        _present(row, "preferred_output") and _present(row, "non_preferred_output")
    )


def _message_list(value: Any, where: str, need_assistant: bool) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise RowError(f"field {where!r} must be a non-empty list of messages")
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise RowError(f"{where}[{i}].role must be one of {'/'.join(ROLES)}")
        if message.get("content") is None and not message.get("tool_calls"):
            raise RowError(f"{where}[{i}].content is missing")
        _content_text(message.get("content") or "", f"{where}[{i}].content")
        out.append(_normalise_message(message))
    if need_assistant and not any(m["role"] == "assistant" for m in out):
        raise RowError(f"field {where!r} has no assistant turn")
    return out


def _shared_prefix(chosen: list[dict], rejected: list[dict]) -> int:
    """Messages both conversations open with (TRL's implicit prompt)."""
    n = 0
    while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
        n += 1
    return n


def _trl_pair(row: dict[str, Any]) -> tuple[Any, Any, Any]:
    chosen, rejected = row["chosen"], row["rejected"]
    if isinstance(chosen, str) or isinstance(rejected, str):
        for key in ("prompt", "chosen", "rejected"):
            _check_string(row, key)
        return row["prompt"], chosen, rejected
    if _present(row, "prompt"):
        prompt = row["prompt"]
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        prompt = _message_list(prompt, "prompt", need_assistant=False)
        return (
            prompt,
            _message_list(chosen, "chosen", need_assistant=True),
            _message_list(rejected, "rejected", need_assistant=True),
        )
    # Implicit prompt: whole conversations whose shared opening turns are the prompt.
    chosen = _message_list(chosen, "chosen", need_assistant=True)
    rejected = _message_list(rejected, "rejected", need_assistant=True)
    n = _shared_prefix(chosen, rejected)
    if n == 0:
        raise RowError(
            "'chosen' and 'rejected' share no opening turns and there is no 'prompt'; "
            "give the prompt as its own field"
        )
    if n == min(len(chosen), len(rejected)):
        raise RowError("'chosen' and 'rejected' have no differing turns after the prompt")
    return chosen[:n], chosen[n:], rejected[n:]


def _openai_pair(row: dict[str, Any]) -> tuple[Any, Any, Any]:
    given = row.get("input")
    if not isinstance(given, dict) or not _present(given, "messages"):
        raise RowError("field 'input' must be an object with 'messages' (OpenAI DPO format)")
    prompt = _message_list(given["messages"], "input.messages", need_assistant=False)
    return (
        prompt,
        _message_list(row["preferred_output"], "preferred_output", need_assistant=True),
        _message_list(row["non_preferred_output"], "non_preferred_output", need_assistant=True),
    )


def preference_pair(row: dict[str, Any]) -> tuple[Any, Any, Any]:
    """``(prompt, chosen, rejected)`` of a preference row, checked.

    Args:
        row: A row in one of the preference shapes (see the module docstring).

    Returns:
        Three strings (TRL's standard shape) or three message lists with string
        contents (conversational shapes; a string prompt becomes one user turn). For
        rows without ``prompt`` the messages ``chosen`` and ``rejected`` open with
        become the prompt.

    Raises:
        RowError: Naming the missing or ill-typed field.
    """
    if not isinstance(row, dict):
        raise RowError(f"a row must be a JSON object, got {type(row).__name__}")
    if _present(row, "chosen") or _present(row, "rejected"):
        for key in ("chosen", "rejected"):
            if not _present(row, key):
                raise RowError(f"missing field {key!r}")
        return _trl_pair(row)
    for key in ("input", "preferred_output", "non_preferred_output"):
        if not _present(row, key):
            raise RowError(
                f"missing field {key!r}; a preference row has 'prompt', 'chosen' and "
                "'rejected' (TRL) or 'input', 'preferred_output' and 'non_preferred_output' "
                "(OpenAI)"
            )
    return _openai_pair(row)
