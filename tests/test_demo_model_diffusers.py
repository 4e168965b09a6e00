"""`sdlora demo-model DIR --family shapes` writes a folder that plain diffusers opens and draws with, with no
dtype argument, before and after loading a demo LoRA, as the README's snippet does."""
import numpy as np
import pytest
import torch

from app.cli import main
from networks.lora_file import save_lora
from networks.metadata import network_metadata
from networks.network import LoraNetwork
from networks.spec import NetworkSpec
from tests.helpers import randomise_up

pytest.importorskip("peft")  # diffusers' load_lora_weights needs it (the `test` extra has it)


def draw(pipe) -> np.ndarray:
    """Two steps at the model's own 64 px: enough to run every part once."""
    return pipe("a red circle on cream paper", num_inference_steps=2, height=64, width=64, output_type="np",
                generator=torch.Generator().manual_seed(0)).images


def demo_lora(pipe, path) -> None:
    """A file laid out as the demo preset's is (rank 8, alpha = r, saved in fp16 like save.precision's
    default), its up weights random so that loading it changes the drawing."""
    network = LoraNetwork.create("sd1", pipe.unet, [pipe.text_encoder],
                                 NetworkSpec(rank=8, alpha_ratio=1.0, train_text_encoder=True))
    randomise_up(network)
    save_lora(path, network.kohya_state_dict(torch.float16), network_metadata(network, "lora"))
    network.detach()


def test_the_shapes_folder_draws_in_plain_diffusers_with_and_without_a_lora(tmp_path, capsys):
    from diffusers import DiffusionPipeline

    folder = tmp_path / "shapes"
    assert main(["demo-model", str(folder), "--family", "shapes"]) == 0
    pipe = DiffusionPipeline.from_pretrained(folder)  # no torch_dtype: what a newcomer types
    assert {part.dtype for part in (pipe.unet, pipe.vae, pipe.text_encoder)} == {torch.float32}
    lora = tmp_path / "demo-lora.safetensors"
    demo_lora(pipe, lora)  # detached again: the pipeline is the plain base model
    base = draw(pipe)
    assert base.shape == (1, 64, 64, 3) and np.isfinite(base).all()

    pipe.load_lora_weights(str(lora))
    styled = draw(pipe)
    assert styled.shape == (1, 64, 64, 3) and np.isfinite(styled).all()
    assert np.abs(styled - base).max() > 1e-3  # the LoRA took part in the drawing
