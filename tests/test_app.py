"""The browser demo: its prediction function on a tiny model, and the real app in headless Chromium (selenium)."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("gradio", reason='the app needs the "app" extra')

from mu0.training.app import mark_points, predict, video_frame  # noqa: E402

APP = Path(__file__).resolve().parent.parent / "training" / "app.py"


@pytest.fixture()
def saved_model(tmp_path, tiny_config, tiny_processor):
    from conftest import make_model

    make_model(tiny_config).save_pretrained(tmp_path / "model")
    tiny_processor.save_pretrained(tmp_path / "model")
    return tmp_path / "model"


def test_predict_draws_the_overlay_and_returns_json_ready_traces(tiny_config, tiny_processor):
    from conftest import make_model

    model = make_model(tiny_config).eval()
    image = np.full((120, 160, 3), 120, np.uint8)
    points = [(40.0, 30.0), (100.0, 80.0)]
    output = predict(model, tiny_processor, image, points, "push", samples=2)
    assert output["overlay"].size == (480, 360)  # 160 x 120 upscaled 3x
    assert np.asarray(output["result"]["pixels"]).shape == (2, 2, tiny_config.horizon, 2)
    assert output["xyz"] is None and json.dumps(output["result"])
    intrinsics = np.array([[100.0, 0, 79.5], [0, 100.0, 59.5], [0, 0, 1]])
    metric = predict(model, tiny_processor, image, points, samples=1, depth=np.full((120, 160), 0.8, np.float32),
                     intrinsics=intrinsics)
    assert metric["xyz"].shape == (1, 2, tiny_config.horizon, 3) and np.abs(metric["xyz"][..., 2] - 0.8).max() < 0.5
    with pytest.raises(ValueError, match="No query points"):
        predict(model, tiny_processor, image, [])
    with pytest.raises(ValueError, match="at most"):
        predict(model, tiny_processor, image, [(1.0, 1.0)] * (tiny_processor.max_queries + 1))
    with pytest.raises(ValueError, match="go together"):
        predict(model, tiny_processor, image, points, depth=np.ones((120, 160), np.float32))


def test_clicked_points_are_marked_and_video_frames_are_read(tmp_path):
    from PIL import Image

    from mu0.processing.visualization import write_video

    marked = mark_points(np.zeros((90, 120, 3), np.uint8), [(60.0, 45.0)])
    assert (marked[45, 57:64] == 255).all(-1).any() and marked[10, 10].sum() == 0
    frames = [Image.new("RGB", (32, 24), (40 * index, 0, 0)) for index in range(5)]
    path = write_video(frames, str(tmp_path / "clip.mp4"), fps=5)
    assert abs(int(video_frame(path, 3)[..., 0].mean()) - 120) < 10
    with pytest.raises(ValueError, match=r"has 5 frames \(0 to 4\); frame 9 does not exist"):
        video_frame(path, 9)


def free_port() -> int:
    with socket.socket() as handle:
        handle.bind(("127.0.0.1", 0))
        return handle.getsockname()[1]


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def saturated_fraction(image: np.ndarray) -> float:
    image = image[..., :3].astype(int)
    return float(((image.max(-1) - image.min(-1)) > 100).mean())


@pytest.mark.skipif(not (shutil.which("chromium") and shutil.which("chromedriver")),
                    reason="needs Debian's chromium and chromium-driver (.ci/run installs them)")
def test_browser_click_then_predict_shows_the_overlay(saved_model, tmp_path):
    """Runs app.py as a Space would (MU0_MODEL), uploads a frame in headless Chromium, clicks a query point,
    presses Predict and checks the screenshot of the output: white query dots and time-coloured traces."""
    from io import BytesIO

    from PIL import Image
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    rng = np.random.default_rng(0)
    frame = np.clip(120 + rng.normal(0, 6, (240, 320, 1)), 0, 255).repeat(3, -1).astype(np.uint8)  # grey, unsaturated
    Image.fromarray(frame).save(tmp_path / "frame.png")
    port = free_port()
    environment = {**os.environ, "MU0_MODEL": str(saved_model), "GRADIO_SERVER_NAME": "127.0.0.1",
                   "GRADIO_SERVER_PORT": str(port), "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1"}
    server = subprocess.Popen([sys.executable, str(APP)], env=environment, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/"

    def serving() -> bool:
        if server.poll() is not None:
            raise AssertionError(f"app.py exited: {server.stdout.read()[-3000:]}")
        try:
            return urllib.request.urlopen(url, timeout=1).status == 200
        except OSError:
            return False

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1200"):
        options.add_argument(flag)
    driver = None
    try:
        wait_for(serving, 90, "the app to serve")
        driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
        driver.get(url)
        upload = wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, "#mu0-input input[type=file]"), 30, "the upload")
        upload[0].send_keys(str(tmp_path / "frame.png"))
        shown = wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, "#mu0-input img"), 30, "the uploaded image")
        status = lambda: driver.find_element(By.ID, "mu0-status").text  # noqa: E731
        wait_for(lambda: "Click on the image" in status(), 30, "the upload to register")
        assert not driver.find_elements(By.CSS_SELECTOR, "#mu0-overlay img")  # no overlay before a prediction
        ActionChains(driver).move_to_element(shown[0]).click().perform()  # one query point at the centre
        wait_for(lambda: "1 query points" in status(), 30, "the click to add a point")
        driver.find_element(By.ID, "mu0-predict").click()
        wait_for(lambda: "1 query points, 1 samples" in status(), 60, "the prediction")
        result = wait_for(lambda: driver.find_elements(By.CSS_SELECTOR, "#mu0-overlay img"), 30, "the overlay")[0]
        wait_for(lambda: driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth", result), 30,
                 "the overlay to load")
        screenshot = np.asarray(Image.open(BytesIO(result.screenshot_as_png)).convert("RGB"))
        height, width = screenshot.shape[:2]
        centre = screenshot[height // 3 : 2 * height // 3, width // 3 : 2 * width // 3]
        assert (centre.min(-1) > 240).sum() > 10  # the white dot of the clicked point, drawn in the middle
        assert saturated_fraction(screenshot) > 0.002  # time-coloured traces and the legend on a grey frame
        assert saturated_fraction(frame) == 0
    finally:
        if driver is not None:
            driver.quit()
        server.terminate()
        server.wait(timeout=30)


def test_training_domain_warnings_are_collected_for_the_page(tiny_config, tiny_processor):
    from conftest import make_model

    from mu0 import Mu0Processor
    from mu0.training.app import warnings_logged

    processor = Mu0Processor(tiny_processor.image_processor, tiny_processor.tokenizer, delta_scale=[0.1, 0.1, 0.05],
                             image_ranges={"mean_intensity": [0.3, 0.6], "height": [96, 96], "width": [96, 96]},
                             max_queries=tiny_processor.max_queries)
    with warnings_logged() as messages:
        predict(make_model(tiny_config).eval(), processor, np.full((540, 960, 3), 120, np.uint8), [(10.0, 20.0)])
    assert len(messages) == 1 and "960x540 frames" in messages[0]


def test_app_errors_reach_the_page_with_their_message(tmp_path):
    """A frame past the end, a corrupt video, a bad .npy or bad intrinsics JSON showed only "Error" in the page."""
    import gradio as gr

    from mu0.training.app import page_inputs, shown_on_the_page

    (tmp_path / "corrupt.mp4").write_bytes(b"not a video at all")
    (tmp_path / "depth.npy").write_bytes(b"\x93NUMPY broken")
    (tmp_path / "K.json").write_text("[[500, 0, 32], [0, 500")
    (tmp_path / "zero_K.json").write_text("[[0, 0, 32], [0, 0, 24], [0, 0, 1]]")
    np.save(tmp_path / "good.npy", np.ones((48, 64), np.float32))
    page_video_frame = shown_on_the_page(video_frame)
    page_read = shown_on_the_page(page_inputs)
    for call, message in [
        (lambda: page_video_frame(str(tmp_path / "corrupt.mp4"), 0), "The video 'corrupt.mp4' cannot be read"),
        (lambda: page_read(str(tmp_path / "depth.npy"), None, 48, 64), "The depth map"),
        (lambda: page_read(str(tmp_path / "good.npy"), str(tmp_path / "K.json"), 48, 64),
         "The intrinsics file"),
        (lambda: page_read(str(tmp_path / "good.npy"), str(tmp_path / "zero_K.json"), 48, 64), "must be positive"),
    ]:
        with pytest.raises(gr.Error) as error:
            call()
        assert message in error.value.message
