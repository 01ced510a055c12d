"""``step37-serve train-demo`` end to end at toy scale: it trains, evaluates and writes a
checkpoint the services load; data-parallel workers train the same model as one process."""

from __future__ import annotations

import argparse
import json
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from encoder_server.model import load_vision_model
from lm_worker.model.loading import load_lm
from services.demo import train


def run_training(out: Path, *extra: str) -> dict:
    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    args = parser.parse_args(["--out", str(out), "--steps", "3", "--batch-size", "2", "--warmup-steps", "1",
                              "--eval-scenes", "2", "--threads", "1", "--no-compile", "--device", "cpu", *extra])
    assert train.run(args) == 0
    return json.loads((out / "training_log.json").read_text())


def test_training_writes_a_checkpoint_the_services_load(tmp_path: Path) -> None:
    report = run_training(tmp_path / "in-loop", "--workers", "1")
    out = tmp_path / "in-loop"
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in out.iterdir()}
    assert report["finished"] and [entry["step"] for entry in report["log"]] == [0, 2]
    assert report["log"][0]["loss"] > report["log"][-1]["loss"] > 0  # it learns something
    assert report["eval"]["scenes"] == 2
    vision = load_vision_model(out, dtype=torch.float32, device="cpu")
    decoder, projector, _ = load_lm(out, dtype=torch.float32, device="cpu")
    assert vision.config.image_size == 224 and projector and decoder is not None


def test_two_workers_train_the_same_model_as_one_process(tmp_path: Path) -> None:
    # Batch 3 splits unevenly (1 + 2 scenes); the loss is the mean over the whole batch either way.
    one = run_training(tmp_path / "one", "--workers", "1", "--batch-size", "3", "--steps", "6")
    two = run_training(tmp_path / "two", "--workers", "2", "--batch-size", "3", "--steps", "6")
    assert two["workers"] == 2 and one["workers"] == 1
    losses_one, losses_two = [e["loss"] for e in one["log"]], [e["loss"] for e in two["log"]]
    assert len(losses_one) == len(losses_two) == 2
    assert all(abs(a - b) <= 1e-4 * a for a, b in zip(losses_one, losses_two, strict=True)), (losses_one, losses_two)
    weights_one = load_file(tmp_path / "one" / "model.safetensors")
    weights_two = load_file(tmp_path / "two" / "model.safetensors")
    assert weights_one.keys() == weights_two.keys()
    for name, tensor in weights_one.items():
        torch.testing.assert_close(weights_two[name], tensor, rtol=0, atol=1e-4, msg=name)  # a step moves weights by ~7e-4


def test_a_worker_renders_only_its_share_of_the_stream(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    args = parser.parse_args(["--out", str(tmp_path)])
    *_, tokenizer, _ = train.build_models(args, tmp_path)
    whole = train.Examples(tokenizer, 224, 16, seed=5).batch(4)
    parts = [train.Examples(tokenizer, 224, 16, seed=5).batch(4, share) for share in (range(0, 1), range(1, 4))]
    assert torch.equal(torch.cat([parts[0][0], parts[1][0]]), whole[0])  # the same pixels, split
    for tensor_index in (1, 2):  # ids and labels, each part padded to its own longest sequence
        rows = [row for part in parts for row in part[tensor_index]]
        for row, expected in zip(rows, whole[tensor_index], strict=True):
            length = len(row)
            assert torch.equal(row, expected[:length]) and torch.all(expected[length:] == row.new_tensor(
                0 if tensor_index == 1 else train.IGNORE))


def test_render_processes_give_the_same_batches_and_the_same_training(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    *_, tokenizer, _ = train.build_models(parser.parse_args(["--out", str(tmp_path)]), tmp_path)
    inline = train.Examples(tokenizer, 224, 16, seed=3)
    with ProcessPoolExecutor(2) as pool:
        ahead = train.Examples(tokenizer, 224, 16, seed=3).prefetched(5, pool, torch.device("cpu"), ahead=2, chunk=2)
        for _ in range(3):  # more batches than are rendered ahead
            for got, expected in zip(next(ahead), inline.batch(5), strict=True):
                assert torch.equal(got, expected)
    rendered = run_training(tmp_path / "rendered", "--workers", "1", "--render-processes", "2")
    in_loop = run_training(tmp_path / "in-loop", "--workers", "1", "--render-processes", "0")
    assert [e["loss"] for e in rendered["log"]] == [e["loss"] for e in in_loop["log"]]
    assert rendered["device"] == "cpu"


def test_a_device_that_is_not_there_is_a_clear_error(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    for extra, message in ((["--device", "nonsense"], "--device nonsense:"),
                           (["--render-processes", "-1", "--device", "cpu"], "--render-processes must be >= 0"),
                           (["--render-processes", "1", "--workers", "2", "--device", "cpu"], "one process trains"),
                           (["--device", "cuda:64"], "not a CUDA device here"),
                           *([(["--device", "cuda"], "not a CUDA device here")] if not torch.cuda.is_available()
                             else [])):
        with pytest.raises(SystemExit, match=message):
            train.run(parser.parse_args(["--out", str(tmp_path), *extra]))


def test_the_vision_learning_rate_scale_applies_to_the_tower_and_projector(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    args = parser.parse_args(["--out", str(tmp_path), "--vision-lr-scale", "3"])
    vision, decoder, fusion, _, _ = train.build_models(args, tmp_path)
    optimizer = train.make_optimizer(vision, decoder, fusion, args)
    train.set_learning_rate(optimizer, 1e-3)
    by_id = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    everything = [*vision.parameters(), *decoder.parameters(), *fusion.parameters()]
    assert len(by_id) == sum(len(g["params"]) for g in optimizer.param_groups)  # each weight once
    assert set(by_id) == {id(p) for p in everything}
    assert {by_id[id(p)] for p in [*vision.parameters(), *fusion.align_projector.parameters()]} == {3e-3}
    assert {by_id[id(p)] for p in decoder.parameters()} == {1e-3}


def test_learning_rate_schedules_warm_up_then_decay_to_five_percent() -> None:
    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    cosine = parser.parse_args(["--steps", "100", "--warmup-steps", "10", "--lr", "1e-3", "--schedule", "cosine",
                                "--start-steps", "0"])
    wsd = parser.parse_args(["--steps", "100", "--warmup-steps", "10", "--lr", "1e-3", "--schedule", "wsd",
                             "--decay-fraction", "0.2", "--start-steps", "0"])
    for args in (cosine, wsd):
        rates = [train.learning_rate(step, args) for step in range(100)]
        assert rates[0] == 1e-4 and abs(rates[9] - 1e-3) < 1e-12  # linear warm-up to the peak
        assert abs(rates[-1] - 5e-5) < 1e-6 and all(a >= b for a, b in zip(rates[9:], rates[10:], strict=False))
    stable = [train.learning_rate(step, wsd) for step in range(10, 80)]
    assert all(abs(rate - 1e-3) < 1e-12 for rate in stable)  # wsd holds the peak until the last 20 steps
    assert train.learning_rate(89, wsd) == 1e-3 * (0.05 + 0.95 * 10 / 20)
    assert train.learning_rate(50, cosine) < 1e-3 * 0.8  # cosine is already decaying at mid-run


def test_a_lower_start_rate_holds_then_ramps_to_the_peak() -> None:
    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    args = parser.parse_args(["--steps", "100", "--warmup-steps", "10", "--lr", "1e-3", "--schedule", "wsd",
                              "--decay-fraction", "0.2", "--start-lr", "4e-4", "--start-steps", "30"])
    rates = [train.learning_rate(step, args) for step in range(100)]
    assert abs(rates[9] - 4e-4) < 1e-12 and all(abs(rate - 4e-4) < 1e-12 for rate in rates[10:30])
    assert all(a < b for a, b in zip(rates[29:40], rates[30:40], strict=False))  # the ramp
    assert all(abs(rate - 1e-3) < 1e-12 for rate in rates[39:80])
    assert abs(rates[-1] - 5e-5) < 1e-9


def test_cosine_decay_starts_at_the_peak_after_the_start_rate_ramp() -> None:
    parser = argparse.ArgumentParser()
    train.add_arguments(parser)
    args = parser.parse_args(["--steps", "100", "--warmup-steps", "10", "--lr", "1e-3", "--schedule", "cosine",
                              "--start-lr", "4e-4", "--start-steps", "30"])
    rates = [train.learning_rate(step, args) for step in range(100)]
    assert abs(rates[39] - 1e-3) < 1e-12 and abs(rates[40] - 1e-3) < 1e-12  # ramp ends, cosine begins at the peak
    assert all(a >= b for a, b in zip(rates[40:], rates[41:], strict=False))


def test_compiled_training_matches_eager(tmp_path: Path) -> None:
    eager = run_training(tmp_path / "eager", "--workers", "1")
    compiled = run_training(tmp_path / "compiled", "--workers", "1", "--compile")
    assert compiled["compiled"] and not eager["compiled"]  # it did compile, rather than fall back
    losses_eager, losses_compiled = [e["loss"] for e in eager["log"]], [e["loss"] for e in compiled["log"]]
    assert all(abs(a - b) <= 1e-3 * a for a, b in zip(losses_eager, losses_compiled, strict=True)), (
        losses_eager, losses_compiled)


def test_a_failing_compile_falls_back_to_eager(tmp_path: Path, monkeypatch, capsys) -> None:
    class Broken(torch.nn.Module):
        def forward(self, *args, **kwargs):
            raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(torch, "compile", lambda module, **kwargs: Broken())
    fallen_back = run_training(tmp_path / "fallback", "--workers", "1", "--compile")
    eager = run_training(tmp_path / "eager", "--workers", "1")
    assert "torch.compile failed (RuntimeError: no C++ compiler); training without it" in capsys.readouterr().out
    assert not fallen_back["compiled"]
    assert [e["loss"] for e in fallen_back["log"]] == [e["loss"] for e in eager["log"]]
