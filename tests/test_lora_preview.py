"""The Try tab's comparison reads prompts the way the LoRA was trained (its ss_clip_skip)."""
import numpy as np
import pytest
import torch

from app.ui.lora_preview import LoraPreview, clip_skip_of, prompt_chunks_of
from networks.errors import SdloraError
from networks.lora_file import save_lora
from networks.metadata import network_metadata
from networks.spec import NETWORK_TYPES
from tests.helpers import attached, randomise_up


def test_clip_skip_of_reads_kohya_and_sdlora_files():
    assert clip_skip_of({"ss_clip_skip": "2"}) == 2
    assert clip_skip_of({"ss_clip_skip": "None"}) == 1 and clip_skip_of({}) == 1 and clip_skip_of({"ss_clip_skip": "0"}) == 1


def test_prompt_windows_follow_the_files_max_token_length():
    assert [prompt_chunks_of({"ss_max_token_length": v}) for v in ("225", "150", "75", "None")] == [3, 2, 1, 1]
    assert prompt_chunks_of({}) == 1 and prompt_chunks_of({"ss_max_token_length": "900"}) == 3


def test_the_base_image_changes_with_the_files_clip_skip(tmp_path):
    _, network = attached("sd1", "lora")
    randomise_up(network)
    files = {}
    for skip in (1, 2):
        files[skip] = tmp_path / f"skip{skip}.safetensors"
        metadata = network_metadata(network, "lora", training={"ss_clip_skip": skip})
        save_lora(files[skip], network.kohya_state_dict(), metadata)
    preview = LoraPreview()
    one = preview.compare("demo:sd1", files[1], "a red circle", steps=2, size=64)
    assert preview._clip_skip == 1
    two = preview.compare("demo:sd1", files[2], "a red circle", steps=2, size=64)
    assert preview._clip_skip == 2
    assert not np.array_equal(np.asarray(one.without), np.asarray(two.without))  # the base reads another layer
    again = preview.compare("demo:sd1", files[1], "a red circle", steps=2, size=64)
    assert np.array_equal(np.asarray(one.without), np.asarray(again.without))


def test_the_try_tab_renders_on_the_gpu_in_fp16_when_there_is_one(monkeypatch):
    from app.ui.lora_preview import preview_placement

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert preview_placement() == ("cpu", torch.float32)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert preview_placement() == ("cuda", torch.float16)


def test_the_room_check_runs_before_the_model_moves_and_names_the_run(monkeypatch, tmp_path):
    import app.ui.lora_preview as lora_preview

    monkeypatch.setattr(lora_preview, "preview_placement", lambda: ("cuda", torch.float32))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (int(1e9), int(8e9)))
    preview = LoraPreview()
    with pytest.raises(SdloraError) as error:
        preview.compare("demo:sd1", tmp_path / "x.safetensors", "a cat", training=True)
    assert str(error.value).startswith("The GPU has 1.0 GB free and this model needs about ")
    assert str(error.value).endswith("a training run is using this GPU: try again when it has finished, or stop it.")
    assert preview._model is None  # nothing was kept (or moved) for a refused model


def test_a_model_that_does_not_fit_beside_a_training_run_is_one_sentence():
    from app.ui.lora_preview import GPU_HEADROOM, gpu_room_problem

    weights = 5e9  # an SDXL model in fp16
    assert gpu_room_problem(int(weights + GPU_HEADROOM), int(weights), training=True) is None
    assert gpu_room_problem(int(4e9), int(weights), training=True) == (
        "The GPU has 4.0 GB free and this model needs about 7.5 GB; a training run is using this GPU: try again "
        "when it has finished, or stop it.")
    assert gpu_room_problem(int(4e9), int(weights), training=False).endswith(
        "close what else uses the GPU, or try a smaller model.")


@pytest.fixture(scope="module")
def preview():
    return LoraPreview()


@pytest.mark.parametrize("kind", NETWORK_TYPES)
def test_the_try_tab_draws_every_adapter_type_and_weight_0_is_the_base(preview, kind, tmp_path):
    _, network = attached("sd1", kind, include_convs=True)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():  # every factor moved off its no-op start (DoRA's magnitude, OFT's blocks included)
        for parameter in network.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    path = tmp_path / f"{kind}.safetensors"
    save_lora(path, network.kohya_state_dict(), network_metadata(network, kind))
    drawn = preview.compare("demo:sd1", path, "a red circle", steps=2, size=64)
    off = preview.compare("demo:sd1", path, "a red circle", steps=2, size=64, weight=0.0)
    assert np.array_equal(np.asarray(off.with_lora), np.asarray(drawn.without))
    change = np.abs(np.asarray(drawn.with_lora, dtype=np.int16) - np.asarray(drawn.without, dtype=np.int16))
    assert change.mean() > 1.0, (kind, change.mean())
