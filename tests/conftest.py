"""Test-wide settings: everything offline, on CPU, in fp32, loopback only."""
import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("NO_PROXY", "localhost,127.0.0.1")
os.environ.setdefault("no_proxy", "localhost,127.0.0.1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The built-in demo models are built once per machine into a shared cache (atomic, so parallel test
# workers can race safely); user presets go to a throwaway home so no test sees a developer's presets.
os.environ.setdefault("SDLORA_CACHE", os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".test-cache"))
os.environ.setdefault("SDLORA_HOME", os.path.join(os.environ["SDLORA_CACHE"], "home"))

# Under pytest-xdist each worker gets one of the two cores: more threads per worker only contend
# (a tiny UNet step took 30x longer with oversubscribed threads). Subprocesses inherit the setting.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def browser():
    """Debian's Chromium through Playwright, one per test module (modules skip first when either is missing)."""
    from playwright.sync_api import sync_playwright

    from tests.ui_support import launch_chromium

    with sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def data8(tmp_path_factory):
    """Eight demo-style images with captions, made once per test module."""
    return _demo_images(tmp_path_factory, 8)


@pytest.fixture(scope="module")
def data4(tmp_path_factory):
    """Four demo-style images with captions, for runs that only need a few steps."""
    return _demo_images(tmp_path_factory, 4)


def _demo_images(tmp_path_factory, count: int):
    from trainer.demo.demo_data import make_demo_dataset

    folder = tmp_path_factory.mktemp(f"data{count}")
    make_demo_dataset(folder, count=count, seed=0)
    return folder
