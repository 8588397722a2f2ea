"""Fine-tuning end to end on a local Ray cluster with real DeepSpeed engines (CPU, gloo)."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import pytest
import ray.cloudpickle
import torch
from harness import StopAfterCheckpoint
from specs import merged, tiny_spec

from rayft.trainers.config import validate_spec
from rayft.trainers.driver import run_training
from rayft.trainers.loop import LoopCallback, TrainerState

pytestmark = pytest.mark.slow

# Workers unpickle this module's callbacks without importing the test module.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def chat_file(tmp_path_factory, color_chats) -> Path:
    path = tmp_path_factory.mktemp("data") / "colors.jsonl"
    return color_chats(path, 96)


def make_spec(chat_file: Path, name: str, **sections) -> object:
    spec = tiny_spec(
        chat_file,
        data={"format": "chat", "max_seq_len": 64, "eval_fraction": 0.15},
        method="lora",
        lora={"r": 8, "alpha": 16, "dropout": 0.0},
        optim={
            "lr": 3e-3,
            "max_steps": 12,
            "batch_size": 4,
            "warmup_ratio": 0.0,
            "scheduler": "constant",
        },
        scaling={"num_workers": 2},
        eval={"every_steps": 6},
        output={"name": name},
    )
    return validate_spec(merged(spec, sections))


def train_losses(outcome) -> list[float]:
    return [r["loss"] for r in outcome.history if r["kind"] == "train"]


class LibrariesMapped(LoopCallback):
    """Writes each worker's allocator (libjemalloc mapped, ``MALLOC_CONF``) to ``out/rank<r>.json``."""

    def __init__(self, out: str) -> None:
        self.out = out

    def on_train_end(self, state: TrainerState) -> None:
        import ray.train

        maps = Path("/proc/self/maps").read_text()
        rank = ray.train.get_context().get_world_rank()
        mapped = {"jemalloc": "libjemalloc" in maps, "conf": os.environ.get("MALLOC_CONF")}
        Path(self.out, f"rank{rank}.json").write_text(json.dumps(mapped))


@pytest.fixture(scope="module")
def lora_run(ray_cluster, chat_file, tmp_path_factory) -> tuple[object, object, Path]:
    """One LoRA ZeRO-2 run on two workers: ``(spec, outcome, allocators)``, shared by the
    tests that check what it published and what its workers ran on (each worker writes
    its allocator to ``allocators/rank<r>.json``, see :class:`LibrariesMapped`)."""
    allocators = tmp_path_factory.mktemp("allocators")
    spec = make_spec(chat_file, "colors-lora", deepspeed={"zero_stage": 2})
    outcome = run_training(
        spec, show_progress=False, loop_callbacks=[LibrariesMapped(str(allocators))]
    )
    return spec, outcome, allocators


def test_lora_zero2_two_workers_publishes_a_plain_peft_adapter(
    lora_run, tiny_model_dir, rayft_home, tmp_path
):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    _, outcome, _ = lora_run

    evals = outcome.evals()
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 12
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] - 0.25  # nats
    losses = train_losses(outcome)
    assert len(losses) == 12 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3

    adapter_dir = outcome.artifact
    assert (adapter_dir / "adapter_model.safetensors").is_file()
    manifest = json.loads((adapter_dir / "rayft.json").read_text())
    assert manifest["base_model"] == "tiny-llama" and manifest["steps"] == 12
    assert len(manifest["dataset_sha256"]) == 64
    assert manifest["spec"]["lora"]["r"] == 8

    inputs = torch.tensor([[5, 17, 42, 99, 120, 7, 3]])
    published = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter_dir
    ).eval()
    # The trained weights as DeepSpeed saved them in the run's last checkpoint.
    states = torch.load(
        Path(outcome.checkpoint_path) / "state" / "mp_rank_00_model_states.pt",
        map_location="cpu",
        weights_only=False,
    )["module"]
    trained = get_peft_model(
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"),
    ).eval()
    missing = trained.load_state_dict(states, strict=False)
    assert not [k for k in missing.missing_keys if "lora_" in k]
    base_logits = AutoModelForCausalLM.from_pretrained(tiny_model_dir)(inputs).logits
    with torch.no_grad():
        got, want = published(inputs).logits, trained(inputs).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert not torch.allclose(got, base_logits, atol=1e-3)  # the adapter changed the model

    # TensorBoard event files sit in the run's directory.
    events = list(
        (rayft_home / "runs" / outcome.run_id / "tensorboard").glob("events.out.tfevents.*")
    )
    assert events and events[0].stat().st_size > 0

    # `rayft models export NAME --merge OUT` writes a plain HF model with the same logits.
    from rayft.cluster.cli import main as rayft_main

    out = tmp_path / "merged"
    assert rayft_main(["models", "export", "colors-lora", "--merge", str(out)]) == 0
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(inputs).logits, got, rtol=0, atol=1e-4)
    assert rayft_main(["models", "export", "colors-lora", "--merge", str(out)]) == 2  # not empty


def test_a_compiled_model_takes_the_eager_runs_first_step(lora_run, chat_file):
    # model.compile: DeepSpeed's engine.compile() (inductor). The same spec, data order and
    # seed as the eager run, so its first step sees the same batches and weights (one step:
    # each new batch shape compiles anew, which on CPU costs more than the step).
    _, eager, _ = lora_run
    spec = make_spec(
        chat_file,
        "colors-compiled",
        deepspeed={"zero_stage": 2},
        model={"compile": True},
        optim={"max_steps": 1},
    )
    compiled = run_training(spec, show_progress=False)
    want, got = train_losses(eager)[:1], train_losses(compiled)
    assert len(got) == 1
    assert got == pytest.approx(want, rel=1e-4), (got, want)
    assert compiled.evals()[0]["eval_loss"] == pytest.approx(
        eager.evals()[0]["eval_loss"], rel=1e-4
    )


def test_full_zero3_offload_two_workers_publishes_an_hf_model(ray_cluster, chat_file):
    from transformers import AutoModelForCausalLM

    spec = make_spec(
        chat_file,
        "colors-full",
        method="full",
        deepspeed={"zero_stage": 3, "offload_optimizer": True, "offload_params": True},
        optim={"lr": 1e-3, "gradient_checkpointing": True},
    )
    outcome = run_training(spec, show_progress=False)
    evals = outcome.evals()
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    model = AutoModelForCausalLM.from_pretrained(outcome.artifact)
    assert model.config.num_hidden_layers == 2
    assert (outcome.artifact / "model.safetensors").is_file()
    assert (outcome.artifact / "tokenizer_config.json").is_file()


def test_workers_run_on_jemalloc_by_default(lora_run):
    from rayft.trainers.driver import JEMALLOC_CONF

    spec, outcome, allocators = lora_run
    assert spec.scaling.allocator == "auto"
    assert all(map(math.isfinite, train_losses(outcome)))
    assert sorted(p.name for p in allocators.glob("rank*.json")) == ["rank0.json", "rank1.json"]
    mapped = [json.loads(p.read_text()) for p in allocators.glob("rank*.json")]
    assert mapped == [{"jemalloc": True, "conf": JEMALLOC_CONF}] * 2


def test_embedded_workers_inherit_the_environment_with_no_job_runtime_env(ray_cluster):
    # Without a job runtime environment a new worker skips Ray's set-up process, yet it
    # still finds the registry and runs no preemption watcher on a one-node cluster.
    @ray.remote(num_cpus=0)
    def seen() -> tuple[dict, str | None, str | None]:
        env = ray.get_runtime_context().runtime_env
        return (
            dict(env),
            os.environ.get("RAYFT_HOME"),
            os.environ.get("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"),
        )

    runtime_env, home, watcher = ray.get(seen.remote())
    assert runtime_env == {}
    assert home == os.environ["RAYFT_HOME"] and watcher == "0"


def test_freeze_keeps_early_layers_bit_identical(ray_cluster, chat_file, tiny_model_dir):
    from safetensors.torch import load_file

    spec = make_spec(
        chat_file,
        "colors-freeze",
        method="freeze",
        freeze={"trainable_layers": 1},
        deepspeed={"zero_stage": 1},
        optim={"lr": 1e-3},
    )
    outcome = run_training(spec, show_progress=False)
    before = load_file(tiny_model_dir / "model.safetensors")
    after = load_file(outcome.artifact / "model.safetensors")
    assert before.keys() == after.keys()
    trainable = ("model.layers.1.", "model.norm.", "lm_head.")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "the trainable layers did not change"
    assert all(k.startswith(trainable) for k in changed), sorted(changed)
    for key in before:
        if not key.startswith(trainable):
            assert torch.equal(before[key], after[key]), key


def read_order(run_dir: Path) -> dict[str, list]:
    logs = {}
    for path in sorted((run_dir / "data_order").glob("rank*.jsonl")):
        logs[path.name] = [json.loads(line) for line in path.read_text().splitlines()]
    return logs


def test_resume_continues_with_the_same_steps_and_data_order(ray_cluster, chat_file, rayft_home):
    import ray.train

    common = {
        "optim": {"max_steps": 8},
        "checkpoint": {"every_steps": 2, "keep": 3},
        "eval": {"every_steps": 4},
        "output": {"overwrite": True},
        # The deliberate stop must end the run, not be recovered from by a restart.
        "scaling": {"max_failures": 0},
    }
    straight = run_training(make_spec(chat_file, "resume-a", **common), show_progress=False)

    spec = make_spec(chat_file, "resume-b", **common)
    with pytest.raises((ray.train.TrainingFailedError, RuntimeError)):
        run_training(
            spec,
            run_id="resume-b-run",
            show_progress=False,
            loop_callbacks=[StopAfterCheckpoint(4)],
        )
    interrupted = read_order(rayft_home / "runs" / "resume-b-run")
    assert max(e["step"] for e in interrupted["rank0.jsonl"]) == 4

    resumed = run_training(spec, run_id="resume-b-run", resume=True, show_progress=False)
    assert resumed.metrics["step"] == straight.metrics["step"] == 8
    order_a = read_order(rayft_home / "runs" / straight.run_id)
    order_b = read_order(rayft_home / "runs" / "resume-b-run")
    assert set(order_a) == {"rank0.jsonl", "rank1.jsonl"}
    for rank in order_a:
        assert [e["samples"] for e in order_b[rank]] == [e["samples"] for e in order_a[rank]]
        assert [e["step"] for e in order_b[rank]] == [e["step"] for e in order_a[rank]]
    # Resuming restored the optimizer and schedule too: the final eval matches closely.
    assert resumed.evals()[-1]["eval_loss"] == pytest.approx(
        straight.evals()[-1]["eval_loss"], rel=1e-3
    )


def test_early_stopping_ends_a_diverging_run(ray_cluster, chat_file):
    patience = 2
    spec = make_spec(
        chat_file,
        "colors-diverge",
        optim={"lr": 5.0, "max_steps": 40},
        eval={"every_steps": 2, "early_stopping_patience": patience},
    )
    outcome = run_training(spec, show_progress=False)
    manifest = json.loads((outcome.artifact / "rayft.json").read_text())
    assert manifest["stopped_early"] is True
    assert outcome.metrics["step"] == manifest["steps"] < 40
    losses = [e["eval_loss"] for e in outcome.evals()]
    assert len(losses) >= patience + 1
    # It stopped right after `patience` evaluations without a new best (NaN is no gain).
    best = min((loss for loss in losses[:-patience] if loss == loss), default=float("inf"))
    assert not any(loss < best for loss in losses[-patience:])


def test_a_run_started_in_an_actor_reports_its_state_and_cancel_frees_its_cpus(
    ray_cluster, chat_file, rayft_home
):
    import time

    from rayft.trainers.compat import actor_is_dead
    from rayft.trainers.runs import CONTROLLERS_FILE, PLACEMENT_GROUPS_FILE, start_run
    from rayft.trainers.storage import StorageRoot, run_relpath

    spec = make_spec(
        chat_file, "cancelled-run", optim={"max_steps": 400}, eval={"every_steps": 400}
    )
    # What this run must give back: the CPUs free before it started. What the shared
    # cluster held then (another module's actors, still winding down) is not this run's.
    free_before = ray.available_resources().get("CPU", 0)
    run = start_run(spec, "cancel-me", in_actor=True)
    assert run.status() in ("starting", "running")
    deadline = time.time() + 300
    while not any(event["type"] == "train" for event in run.events()):
        assert not run.done(), run.result()
        assert time.time() < deadline, "no training step within 300 s"
        time.sleep(0.5)
    assert run.status() == "running" and not run.done()
    recorded = StorageRoot.resolve(None).read(run_relpath("cancel-me", PLACEMENT_GROUPS_FILE))
    assert recorded is not None and len(recorded.split()) == 1
    # The Train controller that made the group is recorded too, alive while the run runs.
    [controller] = (
        StorageRoot.resolve(None).read(run_relpath("cancel-me", CONTROLLERS_FILE)).split()
    )
    assert not actor_is_dead(controller.decode())

    run.cancel()
    # cancel() returns once that controller is dead: it can start no new group after.
    assert actor_is_dead(controller.decode())
    with pytest.raises(ray.exceptions.RayActorError):
        run.result(timeout=60)
    # Its driver is gone (read as interrupted: resume continues it), and so are the
    # workers' CPUs, however the controller raced the cancel.
    deadline = time.time() + 30
    while run.status() != "interrupted" or ray.available_resources().get("CPU", 0) < free_before:
        assert time.time() < deadline, (run.status(), ray.available_resources())
        time.sleep(0.5)
    assert not (rayft_home / "adapters" / "cancelled-run").exists()


def test_a_group_whose_controller_died_before_recording_it_is_freed(ray_cluster, rayft_home):
    # A Train controller killed while it starts a worker group (a trial stopped just as its
    # run restarts) leaves a placement group that no run recorded. An actor plays that
    # controller; the run-stopping clean-up must free its group and no other.
    from ray.util.placement_group import placement_group, placement_group_table

    from rayft.trainers.runs import free_stopped_runs
    from rayft.trainers.storage import StorageRoot

    @ray.remote(num_cpus=0)
    class Controller:
        def start_group(self) -> str:
            group = placement_group([{"CPU": 1}])
            ray.get(group.ready(), timeout=60)
            return group.id.hex()

    controller = Controller.remote()
    orphan = ray.get(controller.start_group.remote(), timeout=120)
    kept = placement_group([{"CPU": 1}])  # this job's own group: its creator lives
    ray.get(kept.ready(), timeout=60)
    try:
        ray.kill(controller, no_restart=True)
        free_stopped_runs(StorageRoot.resolve(None), ["no-run-recorded-this-group"])
        table = placement_group_table()
        assert table[orphan]["state"] == "REMOVED"
        assert table[kept.id.hex()]["state"] == "CREATED"
    finally:
        ray.util.remove_placement_group(kept)
