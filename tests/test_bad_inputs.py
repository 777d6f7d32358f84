"""Every repro a careless user found, as a test: bad arguments and files give a ValueError (or a one-line CLI error)
naming what is wrong, never a raw library error, a silent default or a wrong result."""

import json
import os
import tempfile

import numpy as np
import pytest
import torch
from conftest import inference_inputs, make_model, random_batch
from PIL import Image

from mu0 import Mu0ForTracePrediction
from mu0.training.cli import main


# ------------------------------------------------------------------------------------------------- the model
@pytest.mark.parametrize("arguments", [{"num_steps": 0}, {"num_steps": -1}, {"num_steps": 2.5}, {"num_samples": 0},
                                       {"num_samples": -2}])
def test_predict_traces_refuses_bad_counts(tiny_model, tiny_processor, arguments):
    """num_steps=0 silently used the default, -1 returned the input noise; num_samples <= 0 gave a reshape error."""
    batch = inference_inputs(random_batch(tiny_processor))
    (name,) = arguments
    with pytest.raises(ValueError, match=f"{name} must be a positive integer"):
        tiny_model.predict_traces(**batch, **arguments)


def test_one_euler_step_is_not_the_noise(tiny_model, tiny_processor):
    batch = inference_inputs(random_batch(tiny_processor))
    noise = torch.randn(2, 1, 3, tiny_model.config.trace_length, 3, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(tiny_model.predict_traces(**batch, num_steps=1, noise=noise).traces, noise)


def test_a_config_that_is_not_an_object_is_named(tmp_path):
    (tmp_path / "config.json").write_text("[]")
    with pytest.raises(ValueError, match="config.json .* holds a JSON list"):
        Mu0ForTracePrediction.from_pretrained(tmp_path)
    from mu0.training.baselines import load_trace_model

    with pytest.raises(ValueError, match="holds a JSON list"):
        load_trace_model(str(tmp_path))


# --------------------------------------------------------------------------------------------- the processor
def test_16_bit_images_keep_their_range(tiny_processor):
    """`I;16` PNGs were saturated to white by convert("RGB")."""
    grey = np.linspace(0, 65535, 48 * 64).reshape(48, 64).astype(np.uint16)
    image = Image.fromarray(grey)
    assert image.mode.startswith("I")
    from mu0.processing.image_processing_mu0 import to_float_image

    array = to_float_image(image)
    np.testing.assert_allclose(array[..., 0], grey / 65535.0, atol=1e-6)
    assert array.mean() == pytest.approx(0.5, abs=0.01)  # not white
    np.testing.assert_allclose(to_float_image(np.repeat(grey[..., None], 3, -1)), array, atol=1e-6)


def test_integer_images_are_read_as_8_bit(tiny_processor):
    """Integer arrays got an error about float images."""
    from mu0.processing.image_processing_mu0 import to_float_image

    pixels = np.arange(48 * 64 * 3).reshape(48, 64, 3) % 256
    np.testing.assert_allclose(to_float_image(pixels.astype(np.int64)), pixels / 255.0, atol=1e-6)
    with pytest.raises(ValueError, match="images: an int64 image must hold 8-bit values"):
        to_float_image(pixels.astype(np.int64) * 300)


@pytest.mark.parametrize("text", [5, ["push", 5], {"a": 1}])
def test_text_of_the_wrong_type_is_named(tiny_processor, text):
    """text=5 gave `TypeError: 'int' object is not iterable`."""
    images = [np.zeros((48, 64, 3), np.uint8)] * (2 if isinstance(text, list) else 1)
    with pytest.raises(ValueError, match="text must be a string"):
        tiny_processor(images=images, text=text, query_points=[np.array([[10.0, 10.0]])] * len(images))


def test_empty_image_is_named(tiny_processor):
    """A 0x0 image gave a torch interpolation error."""
    with pytest.raises(ValueError, match="images: an image is empty"):
        tiny_processor(images=np.zeros((0, 0, 3), np.uint8), text="x", query_points=np.array([[0.0, 0.0]]))


@pytest.mark.parametrize("z", [0.0, -1.0])
def test_query_depth_must_be_positive(tiny_processor, z):
    """Zero or negative query z was accepted and came back as negative metric z."""
    with pytest.raises(ValueError, match="depth z must be positive"):
        tiny_processor(images=np.zeros((48, 64, 3), np.uint8), text="x", query_points=np.array([[10.0, 10.0, z]]))


# ----------------------------------------------------------------------------------------------- mu0 predict
@pytest.fixture()
def saved_model(tmp_path, tiny_config, tiny_processor):
    make_model(tiny_config).save_pretrained(tmp_path / "model")
    tiny_processor.save_pretrained(tmp_path / "model")
    Image.fromarray(np.full((48, 64, 3), 120, np.uint8)).save(tmp_path / "frame.png")
    (tmp_path / "K.json").write_text(json.dumps([[60.0, 0, 31.5], [0, 60.0, 23.5], [0, 0, 1]]))
    return tmp_path


def predict(folder, *extra) -> list[str]:
    return ["predict", "--model", str(folder / "model"), "--image", str(folder / "frame.png"),
            "--output-dir", str(folder / "out"), *extra]


def one_line_error(capsys) -> str:
    """The CLI's error line (stderr may also hold progress bars)."""
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("mu0 ")]
    assert len(lines) == 1 and ": error: " in lines[0], lines
    return lines[0]


@pytest.mark.parametrize("depth, message", [
    (np.full((10, 10), 0.9), r"must be a numeric \(H, W\) = \(48, 64\) map"),  # smaller than the image: IndexError
    (np.full((48, 64), -0.9), "has negative values"),
    (np.zeros((48, 64)), "no depth at query point"),
])
def test_predict_checks_the_depth_map(saved_model, capsys, depth, message):
    np.save(saved_model / "depth.npy", depth)
    code = main(predict(saved_model, "--depth", str(saved_model / "depth.npy"), "--intrinsics", str(saved_model / "K.json")))
    assert code == 1
    assert __import__("re").search(message, one_line_error(capsys))


@pytest.mark.parametrize("intrinsics, message", [
    ("[[0, 0, 31.5], [0, 0, 23.5], [0, 0, 1]]", "the focal lengths fx = 0 and fy = 0 must be positive"),  # Infinity
    ("[[-60, 0, 31.5], [0, -60, 23.5], [0, 0, 1]]", "the focal lengths fx = -60 and fy = -60 must be positive"),
    ("[[60, 0, 31.5], [0, 60", "is not a JSON 3x3 matrix of numbers"),  # a raw JSONDecodeError without the file
    ("[[60, 0], [0, 60]]", "must hold a finite 3x3 matrix"),
])
def test_predict_checks_the_intrinsics(saved_model, capsys, intrinsics, message):
    np.save(saved_model / "depth.npy", np.full((48, 64), 0.9))
    (saved_model / "K.json").write_text(intrinsics)
    code = main(predict(saved_model, "--depth", str(saved_model / "depth.npy"), "--intrinsics", str(saved_model / "K.json")))
    assert code == 1
    error = one_line_error(capsys)
    assert f"--intrinsics {str(saved_model / 'K.json')!r}" in error and message in error
    assert not (saved_model / "out").exists()


def test_predict_names_an_unreadable_depth_file(saved_model, capsys):
    (saved_model / "depth.npy").write_bytes(b"\x93NUMPY truncated")
    code = main(predict(saved_model, "--depth", str(saved_model / "depth.npy"), "--intrinsics", str(saved_model / "K.json")))
    assert code == 1 and "is not a readable .npy file" in one_line_error(capsys)


def test_predict_reads_16_bit_images(saved_model):
    """A 16-bit PNG used to become a 99.6 % white frame."""
    grey = np.tile(np.linspace(0, 65535, 64), (48, 1)).astype(np.uint16)
    Image.fromarray(grey).save(saved_model / "frame.png")
    assert main(predict(saved_model, "--grid", "2")) == 0
    overlay = np.asarray(Image.open(saved_model / "out" / "overlay.png").convert("L"), dtype=np.float64)
    assert (overlay > 250).mean() < 0.5  # a gradient, not a white frame


def test_predict_accepts_negative_coordinates_and_names_them(saved_model, capsys):
    """`--points -10,20` was refused by the argument parser as an unknown option."""
    assert main(predict(saved_model, "--points", "-10,20")) == 1
    assert "Query point 0 of sample 0 ([-10.0, 20.0]) lies outside the 64x48 image" in one_line_error(capsys)
    assert main(predict(saved_model, "--points", "-0.4,20", "5,5")) == 0  # inside: pixel centres start at -0.5


@pytest.mark.parametrize("arguments", [["demo", "--steps", "0"], ["train", "--dataset", "d", "--max-steps", "0"],
                                       ["train", "--dataset", "d", "--max-steps", "-5"], ["predict", "--model", "m",
                                       "--image", "i", "--samples", "0"]])
def test_counts_must_be_positive(arguments, capsys):
    """`demo --steps 0` saved an untrained model after "loss nan -> nan"; `--max-steps 0` trained one step, -5 three
    epochs."""
    with pytest.raises(SystemExit) as exit_info:
        main(arguments)
    assert exit_info.value.code == 2 and "must be a positive integer" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------- mu0 train
@pytest.fixture(scope="module")
def samples_folder(tmp_path_factory):
    from mu0.dataset_builders.trace_extract import TraceExtract
    from mu0.training.pretrain import save_samples

    root = tmp_path_factory.mktemp("samples")
    builder = TraceExtract(config_name="samples", source="procedural", num_episodes=1, num_frames=30, image_size=64,
                           cache_dir=str(root / "cache"), work_dir=str(root / "work"), settings={"frame_stride": 6})
    builder.download_and_prepare()
    save_samples(builder.as_dataset(split="train"), builder.compute_statistics(), str(root / "samples"))
    return root / "samples"


def test_train_names_a_missing_local_dataset(tmp_path, capsys):
    """A missing local path was reported as a malformed Hub repo id."""
    assert main(["train", "--dataset", str(tmp_path / "no" / "such"), "--output-dir", str(tmp_path / "run")]) == 1
    error = one_line_error(capsys)
    assert "no such file or folder" in error and "repo" not in error.lower()


def test_train_refuses_a_dataset_without_rows(tmp_path, samples_folder, capsys):
    """A 0-row dataset gave a raw IndexError."""
    from datasets import load_from_disk

    from mu0.dataset_builders.statistics import load_statistics
    from mu0.training.pretrain import save_samples

    empty = load_from_disk(str(samples_folder)).select([])
    save_samples(empty, load_statistics(str(samples_folder)), str(tmp_path / "empty"))
    assert main(["train", "--dataset", str(tmp_path / "empty"), "--output-dir", str(tmp_path / "run")]) == 1
    assert "has no rows" in one_line_error(capsys)


def unwritable_folder(tmp_path) -> str:
    """A folder this process cannot write to: a read-only one, or (as root, who ignores permissions) a place in
    sysfs where no file can be made."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    for candidate in (str(folder), "/sys/mu0-output"):
        try:
            os.makedirs(candidate, exist_ok=True)
            with tempfile.TemporaryFile(dir=candidate):
                pass
        except OSError:
            return candidate
    pytest.skip("no unwritable folder on this machine")


def test_read_only_output_folder_fails_before_training(tmp_path, samples_folder, capsys):
    """A read-only output folder failed only at the first checkpoint, after the training it would have saved."""
    output = unwritable_folder(tmp_path)
    assert main(["train", "--dataset", str(samples_folder), "--output-dir", output, "--max-steps", "1"]) == 1
    assert f"--output-dir {output!r} is not a writable folder" in one_line_error(capsys)
    assert main(["demo", "--quick", "--output-dir", output]) == 1
    assert "is not a writable folder" in one_line_error(capsys)


def test_resume_from_a_truncated_checkpoint_is_named(tmp_path, samples_folder, capsys):
    """`--resume` from a checkpoint cut short by a kill gave a raw SafetensorError."""
    run = tmp_path / "run"
    assert main(["train", "--dataset", str(samples_folder), "--output-dir", str(run), "--max-steps", "2",
                 "--eval-samples", "0"]) == 0
    weights = run / "model.safetensors"
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    (checkpoint / "model.safetensors").write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    capsys.readouterr()
    assert main(["train", "--dataset", str(samples_folder), "--output-dir", str(run), "--resume", str(checkpoint)]) == 1
    assert "model.safetensors is truncated or corrupt" in one_line_error(capsys)


def test_train_refuses_a_folder_holding_another_model(tmp_path, samples_folder, capsys):
    """Training into a folder with another model overwrote it, exit 0, its other files mixed in with the new ones."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text('{"model_type": "another"}')
    (run / "notes.txt").write_text("keep me")
    arguments = ["train", "--dataset", str(samples_folder), "--output-dir", str(run), "--max-steps", "1",
                 "--eval-samples", "0"]
    assert main(arguments) == 1
    assert f"--output-dir {str(run)!r} is not empty (config.json, notes.txt)" in one_line_error(capsys)
    assert sorted(os.listdir(run)) == ["config.json", "notes.txt"]
    assert main([*arguments, "--overwrite-output-dir"]) == 0
    assert "notes.txt" not in os.listdir(run)
    assert json.loads((run / "config.json").read_text())["model_type"] == "mu0"


@pytest.mark.parametrize("error", [
    RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0"),  # torch.save
    RuntimeError("basic_ios::clear: iostream error"),  # torch.save, when the disk fills at another byte
    OSError(28, "No space left on device"),
])
def test_a_full_disk_is_named_with_the_folder_being_written(tmp_path, monkeypatch, error):
    """A full disk during `mu0 train` showed torch's zip-writer error; the demo left eval.tmp/ behind."""
    import shutil
    from collections import namedtuple

    from mu0.training.cli import named_write_failures

    (tmp_path / "eval.tmp").mkdir()
    (tmp_path / "checkpoint-2").mkdir()
    (tmp_path / "checkpoint-2" / "optimizer.pt").write_bytes(b"half")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: namedtuple("usage", "total used free")(10, 10, 0))
    with pytest.raises(OSError, match=r"No space left on device while writing .*checkpoint-2 \(0.0 MiB free\)"):
        with named_write_failures(str(tmp_path)):
            raise error
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-2"]
    with pytest.raises(RuntimeError, match="unrelated"):  # other errors pass through untouched
        with named_write_failures(str(tmp_path)):
            raise RuntimeError("unrelated")


def test_unreadable_statistics_recipe_and_optimizer_files_are_named(tmp_path, samples_folder, capsys):
    """A truncated trace_statistics.json or recipe gave a JSON error without the file; a corrupt optimizer.pt on
    --resume a multi-line pickle error."""
    import shutil

    from safetensors.torch import save_file

    dataset = tmp_path / "samples"
    shutil.copytree(samples_folder, dataset)
    statistics = dataset / "trace_statistics.json"
    statistics.write_text(statistics.read_text()[:100])
    assert main(["train", "--dataset", str(dataset), "--output-dir", str(tmp_path / "run")]) == 1
    assert f"{statistics} is not valid JSON" in one_line_error(capsys)
    (tmp_path / "recipe.json").write_text('{"model": ')
    assert main(["train", "--recipe", str(tmp_path / "recipe.json"), "--dataset", str(samples_folder),
                 "--output-dir", str(tmp_path / "run")]) == 1
    assert f"Recipe {str(tmp_path / 'recipe.json')!r} is not valid JSON" in one_line_error(capsys)
    checkpoint = tmp_path / "checkpoint-2"
    checkpoint.mkdir()
    save_file({"weight": torch.zeros(2)}, str(checkpoint / "model.safetensors"))
    (checkpoint / "trainer_state.json").write_text('{"global_step": 2}')
    (checkpoint / "optimizer.pt").write_bytes(b"garbage" * 100)
    assert main(["train", "--dataset", str(samples_folder), "--output-dir", str(tmp_path / "run"),
                 "--resume", str(checkpoint)]) == 1
    assert "optimizer.pt is truncated or corrupt" in one_line_error(capsys)
    assert not (tmp_path / "run").exists()


def test_evaluate_and_train_name_an_episodes_dataset_and_missing_columns(tmp_path, samples_folder, capsys):
    """An episodes folder was reported as lacking trace_statistics.json; a missing column was a raw KeyError."""
    from datasets import load_from_disk

    from mu0.dataset_builders.statistics import load_statistics, save_statistics

    episodes = samples_folder.parent / "episodes"
    if not episodes.exists():
        from mu0.dataset_builders.trace_extract import TraceExtract

        builder = TraceExtract(config_name="episodes", source="procedural", num_episodes=1, num_frames=30,
                               image_size=64, cache_dir=str(samples_folder.parent / "cache"),
                               work_dir=str(samples_folder.parent / "work"), settings={"frame_stride": 6})
        builder.download_and_prepare()
        builder.as_dataset(split="train").save_to_disk(str(episodes))
    for command in (["evaluate", "--model", str(tmp_path)], ["train"]):
        assert main([*command, "--dataset", str(episodes), "--output-dir", str(tmp_path / "out")]) == 1
        assert f"--dataset {str(episodes)!r} is an episodes dataset" in one_line_error(capsys)
    cut = tmp_path / "cut"
    load_from_disk(str(samples_folder)).remove_columns(["future_valid"]).save_to_disk(str(cut))
    save_statistics(load_statistics(str(samples_folder)), str(cut))
    capsys.readouterr()
    for command in (["evaluate", "--model", str(tmp_path)], ["train"]):
        assert main([*command, "--dataset", str(cut), "--output-dir", str(tmp_path / "out")]) == 1
        assert "lacks the samples column(s) ['future_valid']" in one_line_error(capsys)
    assert not (tmp_path / "out").exists()
