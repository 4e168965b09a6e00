"""load_model: demo specs, diffusers folders, original-layout single files, and the user errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from networks.errors import SdloraError
from trainer.model.facts import SHIPPED_CONFIGS, guess_prediction_type, model_facts
from trainer.model.model_loading import load_model
from trainer.model.single_file import save_single_file, to_original_state_dict, unet_name_to_original
from trainer.model.tiny_models import save_demo_model

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {family: save_demo_model(root / family, family) for family in ("sd1", "sd2", "sdxl")}


def _parts(model):
    parts = dict(unet=model.unet, vae=model.vae, text_encoder=model.text_encoders[0])
    if len(model.text_encoders) == 2:
        parts["text_encoder_2"] = model.text_encoders[1]
    return parts


def _unet_out(model):
    torch.manual_seed(0)
    embeds = model.family.encode_prompt(model.text_encoders, model.tokenizers, ["a red fox in snow"])
    added = model.family.unet_added_kwargs(embeds, [(64, 64)], [(0, 0)], [(64, 64)])
    with torch.no_grad():
        return model.unet(
            torch.randn(1, 4, 8, 8), 500, embeds.encoder_hidden_states, added_cond_kwargs=added
        ).sample


@pytest.mark.parametrize(
    "family, prediction", [("sd1", "epsilon"), ("sd2", "v_prediction"), ("sdxl", "epsilon")]
)
def test_diffusers_folder(folders, family, prediction):
    model = load_model(str(folders[family]))
    assert model.family.name == family
    assert model.prediction_type == prediction
    assert model.noise_scheduler.config.prediction_type == prediction
    assert type(model.noise_scheduler).__name__ == "DDPMScheduler"
    assert model.noise_scheduler.config.beta_schedule == "scaled_linear"
    assert len(model.text_encoders) == len(model.tokenizers) == (2 if family == "sdxl" else 1)
    assert model.pipeline().scheduler.config.prediction_type == prediction


def test_demo_spec_and_overrides(tmp_path, monkeypatch):
    monkeypatch.setenv("SDLORA_CACHE", str(tmp_path))
    model = load_model("demo:sd1", prediction_type="v_prediction", dtype=torch.bfloat16)
    assert model.source.startswith(str(tmp_path))
    assert model.prediction_type == model.noise_scheduler.config.prediction_type == "v_prediction"
    assert model.unet.dtype == model.vae.dtype == model.text_encoders[0].dtype == torch.bfloat16


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_single_file_round_trip_gives_the_same_model(folders, tmp_path, family):
    original = load_model(str(folders[family]))
    path = save_single_file(_parts(original), tmp_path / f"{family}.safetensors")
    loaded = load_model(str(path), config_dir=folders[family])
    assert loaded.family.name == family
    assert loaded.prediction_type == original.prediction_type  # SD2: the name has no "base": v_prediction
    facts = model_facts(str(path), config_dir=folders[family])  # what the pre-flight reads: the header only
    assert (facts.family, facts.prediction_type, facts.read_from) == (family, loaded.prediction_type, "weights")
    torch.testing.assert_close(_unet_out(loaded), _unet_out(original), atol=1e-5, rtol=0)
    for a, b in zip(_parts(original).values(), _parts(loaded).values()):
        assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    assert loaded.vae_identity == original.vae_identity


def test_ckpt_loads_with_weights_only(folders, tmp_path):
    original = load_model(str(folders["sd1"]))
    state = to_original_state_dict(_parts(original))
    torch.save({"state_dict": state, "global_step": 7}, tmp_path / "m.ckpt")
    loaded = load_model(str(tmp_path / "m.ckpt"), config_dir=folders["sd1"])
    torch.testing.assert_close(_unet_out(loaded), _unet_out(original), atol=1e-5, rtol=0)


def test_original_names_follow_the_sgm_table(folders):
    config = load_model(str(folders["sdxl"])).unet.config
    assert unet_name_to_original("down_blocks.1.attentions.0.proj_in", config) == "input_blocks.4.1.proj_in"
    assert unet_name_to_original("down_blocks.0.downsamplers.0.conv", config) == "input_blocks.3.0.op"
    assert (
        unet_name_to_original("down_blocks.1.resnets.0.conv_shortcut", config)
        == "input_blocks.4.0.skip_connection"
    )
    assert unet_name_to_original("mid_block.resnets.1.time_emb_proj", config) == "middle_block.2.emb_layers.1"
    assert unet_name_to_original("up_blocks.0.upsamplers.0.conv", config) == "output_blocks.2.2.conv"
    assert unet_name_to_original("up_blocks.1.resnets.2.conv2", config) == "output_blocks.5.0.out_layers.3"


def test_single_file_defaults_to_the_shipped_real_config(folders, tmp_path):
    # The tiny model's shapes differ from real SD1.5, so the shipped config is chosen and reported.
    original = load_model(str(folders["sd1"]))
    path = save_single_file(_parts(original), tmp_path / "tiny.safetensors")
    with pytest.raises(SdloraError, match="does not fit the sd15 model layout"):
        load_model(str(path))


def test_shipped_configs_describe_the_real_models():
    unet = json.loads((SHIPPED_CONFIGS / "sdxl-base/unet/config.json").read_text())
    assert unet["projection_class_embeddings_input_dim"] == 1280 + 6 * unet["addition_time_embed_dim"]
    assert unet["cross_attention_dim"] == 768 + 1280
    sd21 = json.loads((SHIPPED_CONFIGS / "sd21/scheduler/scheduler_config.json").read_text())
    assert sd21["prediction_type"] == "v_prediction"
    for name in ("sd15", "sd21", "sd21-base", "sdxl-base"):
        assert (SHIPPED_CONFIGS / name / "model_index.json").is_file()


def test_prediction_type_guess_for_single_files(tmp_path):
    from trainer.model.family import SD1, SD2, SDXL

    assert guess_prediction_type(SD2, tmp_path / "v2-1_768-ema-pruned.safetensors", []) == "v_prediction"
    assert guess_prediction_type(SD2, tmp_path / "v2-1_512-base.safetensors", []) == "epsilon"
    assert guess_prediction_type(SD1, tmp_path / "sd15.safetensors", []) == "epsilon"
    assert guess_prediction_type(SDXL, tmp_path / "noob.safetensors", ["v_pred"]) == "v_prediction"
    (tmp_path / "custom.yaml").write_text('model:\n  params:\n    parameterization: "v"\n')
    assert guess_prediction_type(SD2, tmp_path / "custom.safetensors", []) == "v_prediction"
    (tmp_path / "custom.yaml").write_text("model:\n  params:\n    linear_start: 0.00085\n")
    assert guess_prediction_type(SD2, tmp_path / "custom.safetensors", []) == "epsilon"


def test_user_errors(tmp_path):
    with pytest.raises(SdloraError, match="The model .*nope.safetensors was not found"):
        load_model(str(tmp_path / "nope.safetensors"))
    fake = tmp_path / "notes.safetensors"
    fake.write_text("these are my notes, not a model")
    with pytest.raises(SdloraError, match="notes.safetensors is not a readable model checkpoint"):
        load_model(str(fake))
    lora = tmp_path / "style.safetensors"
    save_file(
        {
            "lora_unet_conv_in.lora_down.weight": torch.zeros(4, 4),
            "lora_unet_conv_in.alpha": torch.tensor(4.0),
        },
        lora,
    )
    with pytest.raises(SdloraError, match="style.safetensors is a LoRA/LyCORIS adapter, not a base model"):
        load_model(str(lora))
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(SdloraError, match="empty_dir has no model_index.json"):
        load_model(str(tmp_path / "empty_dir"))
    with pytest.raises(SdloraError, match="Unknown model family 'sd4'"):
        load_model("demo:sd1", family="sd4")
    with pytest.raises(SdloraError, match="Unknown prediction type 'x0'"):
        load_model("demo:sd1", prediction_type="x0")
    text = tmp_path / "model.txt"
    text.write_text("x")
    with pytest.raises(SdloraError, match="model.txt is not a model checkpoint"):
        load_model(str(text))


def test_a_text_file_named_ckpt_is_one_sentence_and_no_run_folder(tmp_path):
    from trainer.demo.demo_data import make_demo_dataset

    make_demo_dataset(tmp_path / "data", count=2, seed=0)
    notes = tmp_path / "notes.ckpt"
    notes.write_text("these are my notes, not a model\n")
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "app.cli", "train", "--data", str(tmp_path / "data"), "--preset",
                             "demo", "--output", str(out), "--model", str(notes)],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1
    sentence = (f"The file {notes} is not a valid checkpoint (neither the zip nor the pickle format torch.save "
                "writes); choose a Stable Diffusion .safetensors or .ckpt file.")
    assert result.stderr.strip().splitlines() == ["error: " + sentence]
    assert not out.exists()
    damaged = tmp_path / "damaged.ckpt"  # the pickle protocol byte, then nothing torch.load can read
    damaged.write_bytes(b"\x80\x02these are not opcodes")
    with pytest.raises(SdloraError) as error:
        load_model(str(damaged))
    assert str(error.value) == sentence.replace(str(notes), str(damaged))


def test_pickled_code_in_ckpt_is_refused(tmp_path):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "callback": SdloraError("x")}, path)
    with pytest.raises(SdloraError, match="evil.ckpt holds Python objects that cannot be loaded safely"):
        load_model(str(path))


def test_vae_identity_tracks_encoder_weights(folders):
    a = load_model(str(folders["sd1"]))
    b = load_model(str(folders["sd1"]))
    assert a.vae_identity == b.vae_identity and len(a.vae_identity) == 16
    with torch.no_grad():
        b.vae.decoder.conv_out.weight.add_(1.0)  # decoder-only change: latents unchanged
    from trainer.model.model_loading import vae_identity

    assert vae_identity(b.vae) == a.vae_identity
    with torch.no_grad():
        b.vae.encoder.conv_in.weight.add_(1e-3)
    assert vae_identity(b.vae) != a.vae_identity


@pytest.mark.parametrize("form", ["a1111-file", "ldm-file", "diffusers-folder"])
def test_another_vae_replaces_the_models_own(folders, tmp_path, form):
    from trainer.model.single_file import vae_to_original

    other = load_model(str(folders["sd1"]))
    with torch.no_grad():
        for p in other.vae.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    if form == "diffusers-folder":
        spec = tmp_path / "vae"
        other.vae.save_pretrained(spec)
    else:
        state = vae_to_original(other.vae.state_dict(), other.vae.config)  # first_stage_model.* keys
        if form == "a1111-file":  # A1111's VAE files carry the bare names
            state = {k.removeprefix("first_stage_model."): v for k, v in state.items()}
        spec = tmp_path / "vae.safetensors"
        save_file({k: v.contiguous() for k, v in state.items()}, spec)
    base = load_model(str(folders["sd1"]))
    swapped = load_model(str(folders["sd1"]), vae=str(spec))
    for name, tensor in other.vae.state_dict().items():
        torch.testing.assert_close(swapped.vae.state_dict()[name], tensor, msg=name)
    from trainer.model.model_loading import vae_identity

    assert swapped.vae_identity == vae_identity(other.vae) != base.vae_identity  # caches key on the new VAE
    torch.testing.assert_close(_unet_out(swapped), _unet_out(base))  # nothing else changed


def test_preflight_names_a_missing_vae(tmp_path):
    from trainer.config import config_from_dict
    from trainer.preflight import preflight_report

    cfg = config_from_dict({"dataset": {"path": str(tmp_path)}, "model": {"vae": str(tmp_path / "gone.pt")}})
    assert (f"model.vae {tmp_path / 'gone.pt'} was not found; give a VAE .safetensors file or a diffusers VAE "
            "folder, or leave it empty.") in preflight_report(cfg).errors


def test_a_vae_that_does_not_fit_is_one_sentence(folders, tmp_path):
    sdxl = load_model(str(folders["sdxl"]))
    sdxl.vae.save_pretrained(tmp_path / "xl-vae")
    save_file({"encoder.conv_in.weight": torch.zeros(3, 3, 3, 3)}, tmp_path / "broken.safetensors")
    for spec, start in ((tmp_path / "broken.safetensors", "model.vae {} does not fit this sd1 model's VAE ("),
                        (tmp_path / "nothing.safetensors", "model.vae {} was not found;")):
        with pytest.raises(SdloraError) as error:
            load_model(str(folders["sd1"]), vae=str(spec))
        assert str(error.value).startswith(start.format(spec)), str(error.value)
