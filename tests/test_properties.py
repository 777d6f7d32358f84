"""Property-based tests: arbitrary shapes, dtypes, NaN/inf and sizes 0, 1 or huge give a correct result or a
ValueError naming the argument; never a raw library error, a hang or a silently wrong result.

`max_examples` stays small and `deadline=None` (2 shared CPU cores): these run in the default suite.
"""

import os

import numpy as np
import pytest
import torch
from conftest import inference_inputs, make_model, make_processor, random_batch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from mu0.bspline import bspline_basis, fit_control_points, render_traces
from mu0.dataset_builders.trace_ops import interpolate_at, normalize_pixels, project_to_camera, retarget_times, sample_depth
from mu0.presets import preset_config

FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
SLOW = settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

any_float = st.floats(allow_nan=True, allow_infinity=True, width=32)
finite_float = st.floats(-1e3, 1e3, allow_nan=False, width=32)


def raises_value_error_naming(call, *names: str):
    """Run `call`; if it raises, it must be a ValueError whose message names one of `names`. Returns the result or
    None."""
    try:
        return call()
    except ValueError as error:
        assert any(name in str(error) for name in names), f"{error!r} names none of {names}"
        return None


# ----------------------------------------------------------------------------------------------- B-spline codec
@FAST
@given(num_control_points=st.sampled_from([4, 7, 10]), num_steps=st.integers(1, 64), channels=st.integers(1, 3),
       seed=st.integers(0, 2**16))
def test_spline_traces_are_recovered_exactly(num_control_points, num_steps, channels, seed):
    """A trace that is a spline through the anchor comes back from fit -> render when every step is valid and
    every piece has more steps than unknowns (smoothness 0: the exact least-squares fit)."""
    pieces = (num_control_points - 1) // 3
    if num_steps < 4 * pieces:
        return
    generator = torch.Generator().manual_seed(seed)
    control = torch.rand(2, num_control_points, channels, generator=generator, dtype=torch.float64) - 0.5
    control[:, 0] = 0  # the curve starts at the anchor
    basis = bspline_basis(num_steps, num_control_points, dtype=torch.float64)
    traces = render_traces(control, basis)
    fitted, fit_ok = fit_control_points(traces, torch.ones(traces.shape[:-1], dtype=torch.bool),
                                        num_control_points, smoothness=0.0, clip=None)
    torch.testing.assert_close(render_traces(fitted, basis), traces, atol=1e-8, rtol=0)
    assert fit_ok.all() == (num_steps >= num_control_points)


@FAST
@given(num_control_points=st.sampled_from([4, 7, 10]),
       traces=hnp.arrays(np.float32, st.tuples(st.integers(1, 3), st.integers(1, 40), st.just(3)), elements=any_float),
       data=st.data())
def test_fit_ignores_invalid_steps_and_never_returns_nan(num_control_points, traces, data):
    """Deltas are normalised (|delta| ~ 1): valid steps up to 1e6 are fitted, invalid ones may hold any junk."""
    valid = data.draw(hnp.arrays(bool, traces.shape[:-1]))
    traces = np.where(valid[..., None] & ~(np.abs(traces) <= 1e6), 0.0, traces)
    control, fit_ok = fit_control_points(torch.from_numpy(traces), torch.from_numpy(valid), num_control_points)
    assert torch.isfinite(control).all() and control.abs().max() <= 1.5
    assert torch.equal(fit_ok, torch.from_numpy(valid.sum(-1) >= num_control_points))
    # the same traces with different junk in the invalid steps give the same control points
    junk = np.where(valid[..., None], traces, np.float32(7.0))
    again, _ = fit_control_points(torch.from_numpy(junk), torch.from_numpy(valid), num_control_points)
    torch.testing.assert_close(again, control)


@FAST
@given(num_control_points=st.integers(-3, 20), num_steps=st.integers(-3, 5))
def test_spline_sizes_are_checked(num_control_points, num_steps):
    basis = raises_value_error_naming(lambda: bspline_basis(num_steps, num_control_points), "num_control_points", "num_steps")
    if basis is not None:
        assert basis.shape == (num_steps, num_control_points) and torch.allclose(basis.sum(-1), torch.ones(num_steps))


# --------------------------------------------------------------------------------------------------- trace ops
@FAST
@given(traces=hnp.arrays(np.float64, st.tuples(st.integers(1, 12), st.integers(0, 4), st.just(3)), elements=finite_float),
       times=hnp.arrays(np.float64, st.integers(0, 10), elements=any_float), data=st.data())
def test_interpolation_is_valid_only_inside_the_clip(traces, times, data):
    valid = data.draw(hnp.arrays(bool, traces.shape[:2]))
    values, ok = interpolate_at(traces, valid, times)
    num_frames, num_tracks = traces.shape[:2]
    assert values.shape == (num_tracks, len(times), 3) and ok.shape == (num_tracks, len(times))
    assert np.isfinite(values).all() and not values[~ok].any()
    for step, time in enumerate(times):
        if np.isfinite(time) and 0 <= time <= num_frames - 1 and float(time).is_integer():
            frame = int(time)
            np.testing.assert_allclose(values[ok[:, step], step], traces[frame, ok[:, step]], rtol=1e-5, atol=1e-3)
            assert (ok[:, step] == valid[frame]).all()


@FAST
@given(speed=hnp.arrays(np.float64, st.integers(1, 30), elements=st.floats(0, 0.2)), num_steps=st.integers(0, 40),
       data=st.data())
def test_retargeted_times_stay_in_the_clip_and_move_forward(speed, num_steps, data):
    anchor = data.draw(st.integers(0, len(speed)))
    for direction in (1, -1):
        times = retarget_times(speed, anchor, num_steps, direction)
        assert times.shape == (num_steps,)
        reached = times[np.isfinite(times)]
        assert ((reached >= 0) & (reached <= len(speed))).all()
        assert (np.diff(reached) * direction >= -1e-9).all()
        assert not np.isfinite(times[len(reached):]).any()  # once out of motion, the rest stays invalid


@FAST
@given(world=hnp.arrays(np.float64, st.tuples(st.integers(0, 6), st.just(3)), elements=any_float))
def test_projection_is_valid_only_in_front_of_the_camera(world):
    intrinsics = np.array([[50.0, 0, 32], [0, 50.0, 24], [0, 0, 1]])
    valid = np.isfinite(world).all(-1)
    with np.errstate(all="ignore"):
        traces, in_front = project_to_camera(np.where(valid[:, None], world, 0.0), valid, np.eye(4), intrinsics)
    assert traces.shape == (len(world), 3) and (in_front <= valid).all()
    assert np.isfinite(traces[in_front]).all() and not traces[~in_front].any()
    assert (traces[in_front, 2] > 1e-3).all()


@FAST
@given(size=st.tuples(st.integers(1, 9), st.integers(1, 9)),
       pixels=hnp.arrays(np.float64, st.tuples(st.just(1), st.integers(0, 6), st.just(2)), elements=any_float))
def test_depth_samples_are_positive_or_nan(size, pixels):
    depth = np.random.default_rng(0).uniform(0.5, 2.0, (1, *size))
    values = sample_depth(depth, pixels)
    assert values.shape == pixels.shape[:2]
    good = np.isfinite(values)
    assert (values[good] >= 0.5 - 1e-9).all() and (values[good] <= 2.0 + 1e-9).all()
    height, width = size
    inside = np.isfinite(pixels).all(-1) & (pixels[..., 0] > -0.5) & (pixels[..., 1] > -0.5) & (
        pixels[..., 0] < width - 0.5) & (pixels[..., 1] < height - 0.5)
    assert (good == inside).all()
    if inside.any():
        uv = normalize_pixels(pixels[inside], size)
        assert (np.abs(uv) <= 1).all()


# --------------------------------------------------------------------------------------------------- processor
@pytest.fixture(scope="module")
def processor():
    return make_processor(preset_config("tiny"))


@SLOW
@given(height=st.integers(0, 70), width=st.integers(0, 70), channels=st.sampled_from([1, 3, 4]),
       dtype=st.sampled_from([np.uint8, np.uint16, np.int32, np.float32, np.float64, np.bool_]),
       points=hnp.arrays(np.float64, st.tuples(st.integers(0, 5), st.sampled_from([2, 3])), elements=any_float),
       data=st.data())
def test_processor_gives_tensors_or_names_the_argument(processor, height, width, channels, dtype, points, data):
    image = data.draw(hnp.arrays(dtype, (height, width, channels)))
    result = raises_value_error_naming(
        lambda: processor(images=image, text="push", query_points=points),
        "image", "query", "Query", "RGB", "Float images",
    )
    if result is None:
        return
    assert torch.isfinite(result["pixel_values"]).all() and result["pixel_values"].shape[-1] == processor.image_processor.image_size
    uv = result["query_points"][result["query_mask"]]
    assert (uv.abs() <= 1).all() and len(uv) == len(points)
    expected = np.column_stack([2 * (points[:, 0] + 0.5) / width - 1, 2 * (points[:, 1] + 0.5) / height - 1])
    np.testing.assert_allclose(uv.numpy(), expected, rtol=1e-5, atol=1e-5)


@SLOW
@given(depth=hnp.arrays(np.float64, st.tuples(st.integers(1, 30), st.integers(1, 30)), elements=any_float))
def test_processor_depth_of_any_content(processor, depth):
    image = np.zeros((*depth.shape, 3), np.uint8)
    result = raises_value_error_naming(
        lambda: processor(images=image, text="x", query_points=np.array([[0.0, 0.0, 1.0]]), depth=depth), "Depth", "depth"
    )
    if result is not None:
        assert torch.isfinite(result["depth_pixel_values"]).all()


# ----------------------------------------------------------------------------------------------- predict_traces
@pytest.fixture(scope="module")
def model_and_batch(processor):
    config = preset_config("tiny")
    return make_model(config), inference_inputs(random_batch(processor, num_queries=(2,)))


@SLOW
@given(num_steps=st.one_of(st.none(), st.integers(-3, 3), st.floats(-2, 2)), num_samples=st.integers(-2, 3))
def test_predict_traces_counts(model_and_batch, num_steps, num_samples):
    model, batch = model_and_batch
    prediction = raises_value_error_naming(
        lambda: model.predict_traces(**batch, num_steps=num_steps, num_samples=num_samples), "num_steps", "num_samples"
    )
    if prediction is not None:
        assert prediction.traces.shape == (1, num_samples, 2, model.config.horizon, 3)
        assert torch.isfinite(prediction.traces).all()


@SLOW
@given(points=hnp.arrays(np.float32, st.tuples(st.just(1), st.integers(0, 4), st.integers(1, 3)), elements=any_float))
def test_predict_traces_query_points(model_and_batch, points):
    model, batch = model_and_batch
    batch = {**batch, "query_points": torch.from_numpy(points)}
    for name in ("query_mask", "query_depth", "history", "history_mask"):  # per-query inputs of the old count
        batch.pop(name, None)
    prediction = raises_value_error_naming(lambda: model.predict_traces(**batch, num_steps=2), "query_points")
    if prediction is not None:
        assert torch.isfinite(prediction.traces).all()
        assert prediction.traces.shape[2] == points.shape[1]


# ------------------------------------------------------------------------------------------ a disk that fills up
@pytest.fixture()
def small_disk(tmp_path):
    """A mount point factory for tiny tmpfs file systems (root only; skipped where mounting is not allowed)."""
    import subprocess

    mounted = []

    def mount(size: str) -> str:
        point = tmp_path / f"disk-{len(mounted)}"
        point.mkdir()
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)], capture_output=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
        mounted.append(point)
        return str(point)

    yield mount
    for point in mounted:
        subprocess.run(["umount", str(point)], check=False)


def assert_disk_full_named(capsys, command: str) -> None:
    error = capsys.readouterr().err
    assert "Traceback" not in error
    assert f"\nmu0 {command}: error: [Errno 28] No space left on device while writing " in f"\n{error}", error[-2000:]


GENERATED = ["--source", "procedural", "--num-frames", "30", "--image-size", "64", "--frame-stride", "6", "--no-progress"]


def test_extract_on_a_full_disk(small_disk, capsys):
    from mu0.training.cli import main

    output = os.path.join(small_disk("300k"), "out")
    assert main(["extract", *GENERATED, "--num-episodes", "2", "--output-dir", output]) == 1
    assert_disk_full_named(capsys, "extract")


def test_train_on_a_full_disk(small_disk, tmp_path, capsys):
    """torch.save said "[enforce fail at inline_container.cc:672] . unexpected pos", safetensors gave a traceback."""
    import json

    from mu0.training.cli import main
    from mu0.training.pretrain import load_recipe

    assert main(["extract", *GENERATED, "--num-episodes", "1", "--output-dir", str(tmp_path / "data")]) == 0
    recipe = load_recipe("tiny-cpu")
    recipe["training"].update(save_steps=1, max_steps=2, per_device_train_batch_size=2)
    (tmp_path / "recipe.json").write_text(json.dumps(recipe))
    for size in ("1200k", "2600k"):  # full in optimizer.pt (torch.save) / in model.safetensors (safetensors)
        capsys.readouterr()
        assert main(["train", "--recipe", str(tmp_path / "recipe.json"), "--dataset", str(tmp_path / "data" / "samples"),
                     "--eval-samples", "0", "--output-dir", os.path.join(small_disk(size), "run")]) == 1
        assert_disk_full_named(capsys, "train")


def test_demo_on_a_full_disk_leaves_no_temp_folder(small_disk, capsys):
    from mu0.training.cli import main

    output = os.path.join(small_disk("3m"), "demo")
    assert main(["demo", "--quick", "--output-dir", output]) == 1
    assert_disk_full_named(capsys, "demo")
    assert not [name for name in os.listdir(output) if name.endswith(".tmp")]


# ------------------------------------------------------------------------------- command-line flags and configs
def numeric_flags() -> list[tuple[str, str, object]]:
    """(command, flag, type) of every flag of every `mu0` command that takes a number (`--episodes` takes a list of
    indices and ranges, tested in test_robot_sources)."""
    from mu0.training.cli import build_parser, episode_indices

    commands = build_parser()._subparsers._group_actions[0].choices
    return [(name, action.option_strings[-1], action.type) for name, parser in commands.items()
            for action in parser._actions if action.option_strings and action.type not in (None, str, episode_indices)]


REQUIRED = {"train": ["--dataset", "d"], "evaluate": ["--model", "m", "--dataset", "d"], "convert": ["s", "o"],
            "adapt": ["--base", "b", "--dataset", "d"], "predict": ["--model", "m", "--image", "i"], "view": ["d"],
            "app": ["--model", "m"], "demo": [], "extract": []}
number_text = st.one_of(st.integers(-2**70, 2**70).map(str), st.floats().map(str), st.floats().map(repr),
                        st.text(max_size=8), st.sampled_from(["1e3", "0x10", "1_000", " 7 ", "-0", "inf", "", "٣"]))


def test_every_numeric_flag_is_range_checked():
    from mu0.training.cli import Number

    flags = numeric_flags()
    assert len(flags) > 40
    assert all(isinstance(kind, Number) for _, _, kind in flags), [f for f in flags if not isinstance(f[2], Number)]


@FAST
@given(data=st.data())
def test_numeric_flags_give_a_valid_value_or_an_error_naming_the_flag(data, capsys):
    """Any text for any numeric flag: the parser returns a value the flag's range admits, or exits 2 naming it."""
    from mu0.training.cli import build_parser

    command, flag, kind = data.draw(st.sampled_from(numeric_flags()))
    text = data.draw(number_text)
    capsys.readouterr()
    try:
        args = build_parser().parse_args([command, *REQUIRED[command], f"{flag}={text}"])
    except SystemExit as exit_info:
        assert exit_info.code == 2
        error = capsys.readouterr().err
        assert f"argument {flag}: must be " in error, error
        return
    value = getattr(args, flag.removeprefix("--").replace("-", "_"))
    value = value[0] if isinstance(value, list) else value
    assert kind.check(value) == value and type(value) is kind.kind


def stub_extraction(monkeypatch) -> None:
    """Everything `mu0 extract` checks before extracting, without extracting: the config and settings are built as
    the builder builds them, and the episode list must hold exactly the episodes asked for."""
    from mu0.dataset_builders import executors
    from mu0.dataset_builders.trace_extract import REF_LISTERS, TraceExtractConfig

    def validate_only(config, settings, output_dir, **kwargs):
        built = TraceExtractConfig(name="samples", **config, settings=settings)
        assert built.extraction.horizon >= 1 and built.extraction.retarget_step > 0
        assert len(REF_LISTERS[built.source](built)) == built.num_episodes  # -2 gave 999 998 episodes
        raise SystemExit("validated")

    monkeypatch.setattr(executors, "extract_to_folder", validate_only)


@FAST
@given(data=st.data())
def test_extract_flags_never_end_in_a_traceback(data, tmp_path, monkeypatch, capsys):
    """Any value of any `mu0 extract` flag: a parser error, a one-line error, or settings the builder accepts."""
    from mu0.training.cli import main

    stub_extraction(monkeypatch)
    flags = [(flag, kind) for command, flag, kind in numeric_flags() if command == "extract"]
    chosen = data.draw(st.lists(st.sampled_from(flags), min_size=1, max_size=3, unique=True))
    arguments = [f"{flag}={data.draw(number_text)}" for flag, _ in chosen]
    capsys.readouterr()
    try:
        code = main(["extract", "--source", "procedural", *arguments, "--output-dir", str(tmp_path / "out")])
    except SystemExit as exit_info:
        assert exit_info.code in (2, "validated")
        if exit_info.code == 2:
            assert "must be " in capsys.readouterr().err
        return
    error = capsys.readouterr().err.strip()
    assert code == 1 and error.startswith("mu0 extract: error: ") and "\n" not in error, error


json_value = st.one_of(st.none(), st.booleans(), st.integers(-2**40, 2**40), st.floats(), st.text(max_size=6),
                       st.lists(st.integers(0, 3), max_size=2))


@FAST
@given(data=st.data())
def test_settings_file_values_never_end_in_a_traceback(data, tmp_path, monkeypatch, capsys):
    """Any JSON value for any field of a `--config` settings file: a one-line error naming the field, or settings
    the builder accepts."""
    import json

    from mu0.training.cli import EXTRACT_SETTING_OPTIONS, EXTRACT_SOURCE_OPTIONS, main

    stub_extraction(monkeypatch)
    fields = [("", name) for name in EXTRACT_SOURCE_OPTIONS if name not in ("source", "source_path")]
    fields += [("settings.", name) for name in EXTRACT_SETTING_OPTIONS]
    prefix, name = data.draw(st.sampled_from(fields))
    value = data.draw(json_value)
    options = {"source": "procedural", **({name: value} if not prefix else {"settings": {name: value}})}
    (tmp_path / "options.json").write_text(json.dumps(options))
    capsys.readouterr()
    try:
        code = main(["extract", "--config", str(tmp_path / "options.json"), "--output-dir", str(tmp_path / "out")])
    except SystemExit as exit_info:
        assert exit_info.code == "validated"
        return
    error = capsys.readouterr().err.strip()
    assert code == 1 and error.startswith("mu0 extract: error: ") and "\n" not in error, error
    assert name in error, error


@FAST
@given(field=st.sampled_from(["history_length", "horizon", "max_prompt_length", "max_queries", "delta_scale",
                              "depth_log_range"]), value=json_value)
def test_processor_config_values_load_or_are_named(processor, tmp_path_factory, field, value):
    """Any JSON value for a field of processor_config.json: the processor loads with a usable value, or loading
    fails with a ValueError naming the field."""
    import json

    from mu0 import Mu0Processor

    folder = tmp_path_factory.mktemp("processor")
    processor.save_pretrained(folder)
    path = folder / "processor_config.json"
    config = json.loads(path.read_text())
    config[field] = value
    path.write_text(json.dumps(config))
    loaded = raises_value_error_naming(lambda: Mu0Processor.from_pretrained(folder), field)
    if loaded is not None:
        assert getattr(loaded, field) == value or value is None
