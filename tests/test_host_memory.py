"""Host memory of loading: frozen parts read in the run's dtype (never an fp32 copy of the UNet on a half run),
part by part, each placed before the next is read. bench/host_memory.py measures the real-size peaks."""

import pytest
import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file

import trainer.model.model_loading as model_loading
from trainer.model.checkpoint_parts import part_keys, read_safetensors_part
from trainer.model.single_file import save_single_file
from trainer.model.tiny_models import save_demo_model


@pytest.fixture(scope="module")
def sd1_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("host")
    folder = save_demo_model(root / "sd1", "sd1")
    model = model_loading.load_model(str(folder))
    parts = dict(unet=model.unet, vae=model.vae, text_encoder=model.text_encoders[0])
    # fp16 on disk, as real checkpoints are shipped, so a bf16 run must convert every tensor
    return folder, save_single_file(parts, root / "sd1.safetensors", dtype=torch.float16)


def test_a_half_run_reads_the_unet_in_half_and_places_part_by_part(sd1_file, monkeypatch):
    folder, path = sd1_file
    given = []
    convert = UNet2DConditionModel.from_single_file.__func__

    def spy(cls, state, **kwargs):  # what diffusers is handed: the UNet's tensors, already in the run's dtype
        given.extend(tensor.dtype for tensor in state.values())
        return convert(cls, state, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "from_single_file", classmethod(spy))
    placed = []
    model = model_loading.load_model(str(path), config_dir=folder, dtype=torch.bfloat16, vae_dtype=torch.float32,
                                     place=lambda name, module: placed.append(
                                         (name, {p.dtype for p in module.parameters()})))
    assert given and set(given) == {torch.bfloat16}  # no fp32 (nor fp16) UNet tensor reached the model
    assert placed == [("unet", {torch.bfloat16}), ("vae", {torch.float32}), ("text_encoder", {torch.bfloat16})]
    assert {p.dtype for p in model.unet.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.text_encoders[0].parameters()} == {torch.bfloat16}
    assert {p.dtype for p in model.vae.parameters()} == {torch.float32}


def test_a_part_read_tensor_by_tensor_equals_the_whole_file_converted(sd1_file):
    _, path = sd1_file
    whole = load_file(str(path))
    for part in ("unet", "vae", "text_encoders"):
        keys = part_keys(whole, part)
        assert keys
        read = read_safetensors_part(path, keys, torch.bfloat16)
        assert read.keys() == set(keys)
        for key in keys:
            expected = whole[key].to(torch.bfloat16) if whole[key].is_floating_point() else whole[key]
            assert read[key].dtype == expected.dtype and torch.equal(read[key], expected), key
    covered = {k for part in ("unet", "vae", "text_encoders") for k in part_keys(whole, part)}
    assert covered == set(whole)  # every tensor of the file belongs to one part


def test_a_diffusers_folder_loads_frozen_parts_half_and_the_vae_fp32(sd1_file):
    folder, _ = sd1_file
    names = []
    model = model_loading.load_model(str(folder), dtype=torch.float16, vae_dtype=torch.float32,
                                     place=lambda name, module: names.append(name))
    assert names == ["unet", "vae", "text_encoder"]
    assert model.unet.dtype == model.text_encoders[0].dtype == torch.float16
    assert model.vae.dtype == torch.float32
