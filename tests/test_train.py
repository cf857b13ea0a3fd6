"""The fine-tune loop: learning, the LR schedule, distillation, evaluation, precision, config errors,
and resume — an interrupted run (exception, Ctrl-C, or a real SIGKILL) resumed from its state file
ends with exactly the weights and metrics of an uninterrupted one."""
from __future__ import annotations

import copy
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from tncompress.errors import TncompressError
from tncompress.train import (
    TrainConfig,
    distillation_loss,
    evaluate,
    load_state,
    lr_factor,
    parameter_groups,
    resolve_amp,
    resolve_device,
    train,
    uses_channels_last,
)

NUM_CLASSES = 4
TIMING_KEYS = {"seconds", "images_per_second", "eval_seconds"}


# ----------------------------------------------------------------------------------------- helpers


def blobs(n: int, seed: int) -> TensorDataset:
    """4-class Gaussian blobs of 2×8×8 "images": fixed class means, per-sample noise."""
    means = torch.randn(NUM_CLASSES, 2, 8, 8, generator=torch.Generator().manual_seed(1234))
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    x = means[y] + 0.9 * torch.randn(n, 2, 8, 8, generator=g)
    return TensorDataset(x, y)


TRAIN, TEST = blobs(256, 1), blobs(128, 2)


def conv_net(seed: int = 0) -> nn.Module:
    """Conv + BatchNorm (buffers, 1-D params) + dropout (uses the RNG) + linear."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                         nn.Dropout(0.2), nn.Linear(8 * 8 * 8, NUM_CLASSES))


def mlp(seed: int = 0) -> nn.Module:
    """Deterministic in train mode (no dropout / batch norm): a teacher copy gives identical logits."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(128, 32), nn.ReLU(), nn.Linear(32, NUM_CLASSES))


def factory(batch_size: int = 32):
    """Shuffling DataLoader from the global torch RNG, which train() seeds per epoch."""
    return lambda epoch: DataLoader(TRAIN, batch_size=batch_size, shuffle=True)


def eval_loader() -> DataLoader:
    return DataLoader(TEST, batch_size=64)


def config(**overrides: Any) -> TrainConfig:
    base = dict(epochs=3, batch_size=32, optimizer="sgd", lr=0.05, weight_decay=1e-3, warmup_epochs=0.5,
                device="cpu", amp="off", seed=7)
    base.update(overrides)
    return TrainConfig(**base)


def metrics_only(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in entry.items() if k not in TIMING_KEYS} for entry in history]


def assert_same_weights(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


class Crash(Exception):
    pass


def crash_at(epoch: int, step: int, exc: type[BaseException] = Crash):
    def on_event(event: str, payload: dict[str, Any]) -> None:
        if event == "batch" and payload["epoch"] == epoch and payload["step"] == step:
            raise exc()
    return on_event


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[nn.Module, Any, Path]:
    """Run A: three uninterrupted epochs of conv_net (shared by the resume tests)."""
    path = tmp_path_factory.mktemp("ref") / "state.pt"
    model = conv_net()
    result = train(model, factory(), eval_loader(), config(), state_path=path, report_every=1)
    return model, result, path


# ----------------------------------------------------------------------------------------- learning


def test_training_reduces_loss_and_learns(reference):
    model, result, _ = reference
    losses = [h["train_loss"] for h in result.history]
    assert [h["epoch"] for h in result.history] == [1, 2, 3]
    assert losses[-1] < losses[0]
    assert result.final["top1"] >= 90.0 and result.history[-1]["test_top1"] == result.final["top1"]
    assert result.best_top1 == max(h["test_top1"] for h in result.history)
    assert result.history[result.best_epoch - 1]["test_top1"] == result.best_top1
    assert result.device == "cpu" and result.amp == "off" and result.epochs == 3 and result.seconds > 0
    assert next(model.parameters()).device.type == "cpu" and not model.training
    meta = result.to_metadata()
    assert meta["best_top1"] == result.best_top1 and meta["config"]["lr"] == 0.05
    assert len(meta["history"]) == 3


def test_no_weight_decay_on_biases_and_norm_parameters():
    model = conv_net()
    decay, no_decay = parameter_groups(model, 0.01)
    assert decay["weight_decay"] == 0.01 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(model[0].weight), id(model[5].weight)}
    assert {id(p) for p in no_decay["params"]} == {id(model[0].bias), id(model[1].weight), id(model[1].bias),
                                                     id(model[5].bias)}


def test_lr_schedule_warmup_then_cosine_exact():
    # Direct: 24 steps, 4 warm-up steps.
    f = lambda s, **kw: lr_factor(s, total_steps=24, warmup_steps=4, **kw)  # noqa: E731
    assert [f(s) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert f(14) == pytest.approx(0.5, abs=1e-15)                       # halfway through the cosine
    assert f(23) == pytest.approx(0.5 * (1 + math.cos(math.pi * 19 / 20)), rel=1e-15)
    assert f(14, min_lr_ratio=0.2) == pytest.approx(0.6, abs=1e-15)
    assert f(2, schedule="constant") == 0.75 and f(20, schedule="constant") == 1.0

    # Through train(): lr of each optimizer step, reported per batch (2 epochs × 8 steps, warm-up 0.25 epoch).
    seen: list[float] = []
    cfg = config(epochs=2, warmup_epochs=0.25, lr=0.1)
    train(mlp(), factory(), eval_loader(), cfg, report_every=1,
          on_event=lambda e, p: seen.append(p["lr"]) if e == "batch" else None)
    assert len(seen) == 16
    assert seen[0] == pytest.approx(0.05, rel=1e-12) and seen[1] == pytest.approx(0.1, rel=1e-12)
    assert seen[2] == pytest.approx(0.1, rel=1e-12)
    assert seen[9] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 7 / 14)), rel=1e-12)
    assert seen[15] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 13 / 14)), rel=1e-12)


# ----------------------------------------------------------------------------------------- distillation


def test_distillation_loss_formula():
    s, t = torch.randn(5, 4), torch.randn(5, 4)
    assert distillation_loss(s, s.clone(), 4.0).item() == pytest.approx(0.0, abs=1e-6)
    p_t = F.softmax(t / 2, 1)
    manual = (p_t * (p_t.log() - F.log_softmax(s / 2, 1))).sum(1).mean() * 4
    assert distillation_loss(s, t, 2.0).item() == pytest.approx(manual.item(), rel=1e-5)


def test_kd_with_identical_teacher_starts_at_zero_loss():
    student = mlp()
    teacher = copy.deepcopy(student)
    losses: list[float] = []
    train(student, factory(), eval_loader(), config(epochs=1, kd_weight=1.0), teacher=teacher, report_every=1,
          on_event=lambda e, p: losses.append(p["loss"]) if e == "batch" and p["step"] == 1 else None)
    assert losses[0] == pytest.approx(0.0, abs=1e-6)


def test_kd_moves_student_toward_teacher():
    # A good teacher whose classes are rotated (says c+1 for class c): distillation alone must follow
    # the teacher, not the labels.
    teacher = mlp(1)
    train(teacher, factory(), eval_loader(), config(epochs=3, lr=0.1, warmup_epochs=0))
    with torch.no_grad():
        last = teacher[3]
        last.weight.copy_(last.weight.roll(1, 0))
        last.bias.copy_(last.bias.roll(1, 0))
    x = TEST.tensors[0]

    def agreement(student: nn.Module) -> float:
        with torch.no_grad():
            return (student.eval()(x).argmax(1) == teacher.eval()(x).argmax(1)).float().mean().item()

    student = mlp(2)
    before = agreement(student)
    teacher.train()
    result = train(student, factory(), eval_loader(), config(epochs=4, lr=0.1, warmup_epochs=0, kd_weight=1.0),
                   teacher=teacher)
    assert teacher.training  # used in eval mode, then its own mode is restored
    assert agreement(student) > 0.9 > before
    assert result.final["top1"] < 20.0  # it learned the teacher's rotated labels, not the true ones


def test_kd_weight_without_teacher_is_an_error():
    with pytest.raises(TncompressError, match="teacher"):
        train(mlp(), factory(), eval_loader(), config(kd_weight=0.5))


# ----------------------------------------------------------------------------------------- resume


def test_resume_after_crash_matches_uninterrupted_run(reference, tmp_path):
    model_a, result_a, _ = reference
    path = tmp_path / "state.pt"
    with pytest.raises(Crash):
        train(conv_net(), factory(), eval_loader(), config(), state_path=path, report_every=1,
              on_event=crash_at(epoch=2, step=3))
    assert load_state(path)["epoch"] == 1
    model_b = conv_net(seed=99)  # different init: the weights must come from the state file
    result_b = train(model_b, factory(), eval_loader(), config(), state_path=path, resume=True)
    assert_same_weights(model_a, model_b)
    assert metrics_only(result_b.history) == metrics_only(result_a.history)
    assert (result_b.best_top1, result_b.best_epoch) == (result_a.best_top1, result_a.best_epoch)
    assert result_b.start_epoch == 1 and result_b.epochs == 3


def test_result_does_not_depend_on_the_rng_state_before_the_run(reference):
    model_a, result_a, _ = reference
    model = conv_net()
    torch.manual_seed(12345)  # every epoch is seeded from (seed, epoch): this must not matter
    result = train(model, factory(), eval_loader(), config())
    assert_same_weights(model_a, model)
    assert metrics_only(result.history) == metrics_only(result_a.history)
    other = conv_net()
    train(other, factory(), eval_loader(), config(seed=8))
    assert not torch.equal(other[0].weight, model_a[0].weight)


_CHILD = """
import sys, time
from pathlib import Path
sys.path.insert(0, {tests!r})
import torch
torch.set_num_threads({threads})
import test_train as t

def on_event(event, payload):
    if event == "batch" and payload["epoch"] == 2 and payload["step"] == 2:
        Path({marker!r}).write_text("in epoch 2")
        time.sleep(120)

t.train(t.conv_net(), t.factory(), t.eval_loader(), t.config(), state_path={state!r}, report_every=1,
        on_event=on_event)
"""


def test_resume_after_real_sigkill_matches_uninterrupted_run(reference, tmp_path):
    model_a, result_a, _ = reference
    state, marker, errors = tmp_path / "state.pt", tmp_path / "marker", tmp_path / "stderr.txt"
    code = _CHILD.format(tests=str(Path(__file__).parent), threads=torch.get_num_threads(), marker=str(marker),
                         state=str(state))
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    with open(errors, "w") as err:
        proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL, stderr=err)
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None, errors.read_text()
            assert time.monotonic() < deadline, "child never reached epoch 2"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)  # mid-epoch 2, weights already changed in memory
        assert proc.wait(timeout=30) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert load_state(state)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []
    model_b = conv_net(seed=5)
    result_b = train(model_b, factory(), eval_loader(), config(), state_path=state, resume=True)
    assert_same_weights(model_a, model_b)
    assert metrics_only(result_b.history) == metrics_only(result_a.history)


def test_ctrl_c_leaves_previous_epoch_state_intact(tmp_path):
    path = tmp_path / "state.pt"
    saved: dict[str, bytes] = {}
    crash = crash_at(epoch=2, step=4, exc=KeyboardInterrupt)

    def on_event(event: str, payload: dict[str, Any]) -> None:
        if event == "epoch_start" and payload["epoch"] == 2:
            saved["bytes"] = path.read_bytes()
        crash(event, payload)

    with pytest.raises(KeyboardInterrupt):
        train(conv_net(), factory(), eval_loader(), config(), state_path=path, report_every=1, on_event=on_event)
    assert path.read_bytes() == saved["bytes"]
    state = torch.load(path, weights_only=True)
    assert state["epoch"] == 1 and len(state["history"]) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.pt"]


def test_interrupt_while_writing_the_state_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "state.pt"
    real_save = torch.save
    calls = {"n": 0}

    def flaky_save(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:  # the epoch-2 state: half-written, then Ctrl-C
            Path(f).write_bytes(b"partial")
            raise KeyboardInterrupt
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", flaky_save)
    with pytest.raises(KeyboardInterrupt):
        train(mlp(), factory(), eval_loader(), config(), state_path=path)
    monkeypatch.undo()
    assert load_state(path)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.pt"]


def test_state_file_is_weights_only_loadable_with_all_keys(reference):
    _, result, path = reference
    state = torch.load(path, weights_only=True)
    assert {"format", "format_version", "tncompress_version", "torch_version", "epoch", "steps_per_epoch",
            "config", "model", "optimizer", "scheduler", "scaler", "history", "best", "final", "device", "amp",
            "seconds", "rng"} <= set(state)
    assert state["epoch"] == 3 and state["steps_per_epoch"] == 8
    assert state["config"] == config().to_dict()
    assert state["best"] == {"top1": result.best_top1, "epoch": result.best_epoch}
    assert state["rng"]["torch"].dtype == torch.uint8
    assert set(state["rng"]) >= {"torch", "python", "numpy"}
    assert metrics_only(state["history"]) == metrics_only(result.history)


def test_resume_rules(reference, tmp_path):
    model_a, result_a, ref_path = reference
    path = tmp_path / "state.pt"
    path.write_bytes(ref_path.read_bytes())

    with pytest.raises(TncompressError, match="does not exist"):
        train(conv_net(), factory(), eval_loader(), config(), state_path=tmp_path / "nope.pt", resume=True)
    with pytest.raises(TncompressError, match=r"--lr 0\.05 → 0\.1") as info:
        train(conv_net(), factory(), eval_loader(), config(lr=0.1), state_path=path, resume=True)
    assert "\n" not in str(info.value)
    with pytest.raises(TncompressError, match="--batch-size"):
        train(conv_net(), factory(), eval_loader(), config(batch_size=64), state_path=path, resume=True)
    with pytest.raises(TncompressError, match="may not be smaller"):
        train(conv_net(), factory(), eval_loader(), config(epochs=2), state_path=path, resume=True)
    with pytest.raises(TncompressError, match="batches per epoch"):
        train(conv_net(), factory(batch_size=64), eval_loader(), config(epochs=4), state_path=path, resume=True)
    with pytest.raises(TncompressError, match="does not exist"):
        train(conv_net(), factory(), eval_loader(), config(), state_path=tmp_path / "no" / "state.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(TncompressError, match="not a readable training state"):
        train(conv_net(), factory(), eval_loader(), config(), state_path=tmp_path / "junk.pt", resume=True)

    # A finished run: nothing to do, the saved result comes back and the weights are the saved ones.
    model = conv_net(seed=3)
    done = train(model, factory(), eval_loader(), config(), state_path=path, resume=True)
    assert metrics_only(done.history) == metrics_only(result_a.history) and done.final == result_a.final
    assert_same_weights(model, model_a)

    # More epochs continue where it stopped.
    events: list[int] = []
    more = train(conv_net(), factory(), eval_loader(), config(epochs=4), state_path=path, resume=True,
                 on_event=lambda e, p: events.append(p["epoch"]) if e == "epoch_start" else None)
    assert events == [4] and [h["epoch"] for h in more.history] == [1, 2, 3, 4]
    assert load_state(path)["epoch"] == 4


# ----------------------------------------------------------------------------------------- evaluate


class Logits(nn.Module):
    """Returns its input as logits; has a child kept in eval mode to check modes are restored."""

    def __init__(self) -> None:
        super().__init__()
        self.frozen = nn.BatchNorm1d(6).eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert not self.training
        return x


def test_evaluate_top1_top5_by_hand():
    # 6 classes. Rank of the true class per row: 1st, 2nd, 5th, 6th.
    x = torch.tensor([[9., 1, 2, 3, 4, 5],      # y=0: top-1 hit
                      [1., 9, 8, 3, 4, 5],      # y=2: rank 2 → top-5 hit only
                      [6., 5, 4, 3, 2, 1],      # y=4: rank 5 → top-5 hit only
                      [6., 5, 4, 3, 2, 1]])     # y=5: rank 6 → miss
    y = torch.tensor([0, 2, 4, 5])
    model = Logits().train()
    model.frozen.eval()
    out = evaluate(model, [(x[:2], y[:2]), (x[2:], y[2:])], "cpu")
    assert out["top1"] == 25.0 and out["top5"] == 75.0 and out["images"] == 4 and out["num_classes"] == 6
    assert out["loss"] == pytest.approx(F.cross_entropy(x, y).item(), rel=1e-6)
    assert out["seconds"] >= 0 and out["images_per_second"] > 0
    assert model.training and not model.frozen.training
    with pytest.raises(TncompressError, match="empty"):
        evaluate(model, [], "cpu")


def test_evaluate_with_fewer_than_five_classes():
    x, y = torch.tensor([[3., 2, 1], [3., 2, 1]]), torch.tensor([0, 2])
    out = evaluate(Logits(), [(x, y)])
    assert out["top1"] == 50.0 and out["top5"] == 100.0 and out["num_classes"] == 3


# ----------------------------------------------------------------------------------------- errors, devices


@pytest.mark.parametrize("overrides, needle", [
    ({"lr": 0}, "--lr must be > 0"),
    ({"lr": float("nan")}, "--lr must be a number"),
    ({"epochs": 0}, "--epochs must be ≥ 1"),
    ({"epochs": 2.5}, "--epochs must be a whole number"),
    ({"batch_size": 0}, "--batch-size"),
    ({"optimizer": "adam"}, "--optimizer must be one of sgd, adamw"),
    ({"momentum": 1.0}, "--momentum"),
    ({"weight_decay": -1}, "--weight-decay"),
    ({"nesterov": True, "momentum": 0.0}, "--nesterov needs --momentum > 0"),
    ({"warmup_epochs": 5}, "--warmup-epochs (5) must not exceed --epochs (3)"),
    ({"schedule": "step"}, "--schedule"),
    ({"min_lr_ratio": 2}, "--min-lr-ratio"),
    ({"label_smoothing": 1}, "--label-smoothing"),
    ({"amp": "fp8"}, "--amp must be one of"),
    ({"device": "tpu"}, "--device must be auto, cpu, cuda or cuda:N"),
    ({"seed": -1}, "--seed"),
    ({"kd_temperature": 0}, "--kd-temperature"),
    ({"kd_weight": 1.5}, "--kd-weight must be in [0, 1]"),
    ({"grad_clip": 0}, "--grad-clip must be > 0"),
    ({"memory_format": "nhwc"}, "memory_format must be one of auto, channels-last, contiguous"),
])
def test_bad_config_values_give_one_line_errors(overrides, needle):
    with pytest.raises(TncompressError) as info:
        config(**overrides)
    message = str(info.value)
    assert needle in message and "\n" not in message


def test_auto_layout_is_channels_last_for_conv_models_only():
    assert uses_channels_last("auto", conv_net()) and not uses_channels_last("auto", mlp())
    assert uses_channels_last("channels-last", mlp()) and not uses_channels_last("contiguous", conv_net())


def test_channels_last_trains_like_contiguous_and_hands_the_model_back():
    """Same trajectory in either layout (float rounding aside), and the model and teacher come back
    in the standard layout, so what is saved or compared later is what it was before."""
    results, models = {}, {}
    for layout in ("channels-last", "contiguous"):
        model, teacher = conv_net(), conv_net(seed=5)
        results[layout] = train(model, factory(), eval_loader(), config(memory_format=layout, kd_weight=0.5),
                                teacher=teacher)
        assert all(p.is_contiguous() for p in [*model.parameters(), *teacher.parameters()])
        models[layout] = model
    for key, value in models["contiguous"].state_dict().items():
        torch.testing.assert_close(models["channels-last"].state_dict()[key], value, rtol=1e-4, atol=1e-5, msg=key)
    assert results["channels-last"].history[-1]["test_top1"] == pytest.approx(
        results["contiguous"].history[-1]["test_top1"], abs=1.0)


def test_config_round_trips_through_a_dict():
    cfg = config(optimizer="AdamW", grad_clip=1.0)
    assert cfg.optimizer == "adamw"
    assert TrainConfig.from_dict({**cfg.to_dict(), "future_key": 1}) == cfg


def test_cuda_requested_without_cuda_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name in ("cuda", "cuda:1"):
        with pytest.raises(TncompressError, match=f"--device {name}: CUDA is not available") as info:
            resolve_device(name)
        assert "--device cpu" in str(info.value)
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")


def test_amp_choices_on_cpu():
    cpu = torch.device("cpu")
    assert resolve_amp("auto", cpu) == (None, False, "off")
    assert resolve_amp("bf16", cpu) == (torch.bfloat16, False, "bf16")
    with pytest.raises(TncompressError, match="fp16 needs a CUDA GPU"):
        resolve_amp("fp16", cpu)


def test_bf16_autocast_on_cpu_trains():
    model = mlp()
    result = train(model, factory(), eval_loader(), config(epochs=1, amp="bf16"))
    assert result.amp == "bf16" and math.isfinite(result.history[0]["train_loss"])
    assert next(model.parameters()).dtype == torch.float32  # the model keeps its dtype


def test_float64_model_keeps_its_dtype():
    model = mlp().double()
    result = train(model, factory(), eval_loader(), config(epochs=1, amp="auto", optimizer="adamw", lr=0.01))
    assert result.amp == "off" and next(model.parameters()).dtype == torch.float64


def test_non_finite_loss_stops_with_the_step():
    def poisoned(epoch: int):
        batches = list(DataLoader(TRAIN, batch_size=32))
        x, y = batches[2]
        batches[2] = (torch.full_like(x, float("nan")), y)
        return batches

    with pytest.raises(TncompressError, match=r"NaN at epoch 1, step 3/8 .*lower --lr") as info:
        train(mlp(), poisoned, eval_loader(), config())
    assert "\n" not in str(info.value)
