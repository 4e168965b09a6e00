"""Importing kohya_ss GUI presets: alpha/r kept, kohya's string-typed values read, unmapped keys listed."""

import json

import pytest

from networks.errors import SdloraError
from trainer.config.kohya_import import import_kohya_file, import_kohya_preset, read_kohya_preset
from trainer.config.presets import list_presets, load_preset, resolve_config

# Shaped like kohya_ss presets/lora/*.json: numbers often as strings, unset values as "".
LOCON_SD15 = {
    "LoRA_type": "LyCORIS/LoCon", "LyCORIS_preset": "full", "additional_parameters": "", "block_alphas": "",
    "block_dims": "", "bucket_no_upscale": True, "bucket_reso_steps": 64.0, "cache_latents": True,
    "cache_latents_to_disk": False, "caption_dropout_every_n_epochs": 0.0, "caption_dropout_rate": 0.05,
    "caption_extension": ".caption", "clip_skip": 2, "color_aug": False, "conv_alpha": 4, "conv_dim": 16,
    "enable_bucket": True, "epoch": 12, "flip_aug": True, "full_fp16": False,
    "gradient_accumulation_steps": 2.0, "gradient_checkpointing": False, "keep_tokens": "1",
    "keep_tokens_separator": "|||", "scale_weight_norms": "1", "reg_data_dir": "C:/kohya/reg",
    "lora_network_weights": "C:/loras/old.safetensors", "dim_from_weights": True,
    "noise_offset_random_strength": True, "adaptive_noise_scale": 0.005, "ip_noise_gamma_random_strength": False,
    "min_timestep": 0, "max_timestep": 900, "zero_terminal_snr": True, "v_pred_like_loss": 0, "scale_v_pred_loss_like_noise_pred": False,
    "masked_loss": True, "sdxl_no_half_vae": True, "vae": "C:/vae/ft-mse.safetensors",
    "down_lr_weight": "sine+.5", "mid_lr_weight": "", "up_lr_weight": "0,0,0,1", "block_lr_zero_threshold": "",
    "learning_rate": "0.0002", "lr_scheduler": "cosine_with_restarts", "lr_scheduler_num_cycles": "3",
    "lr_scheduler_power": "", "lr_warmup": "10", "max_bucket_reso": 1024, "max_data_loader_n_workers": "0",
    "max_resolution": "512,512", "max_token_length": "75", "max_train_epochs": "", "max_train_steps": "",
    "mem_eff_attn": False, "min_bucket_reso": 256, "min_snr_gamma": 5, "mixed_precision": "bf16",
    "module_dropout": 0, "network_alpha": 8, "network_dim": 32, "network_dropout": 0.1,
    "noise_offset": "0.05", "noise_offset_type": "Original", "optimizer": "AdamW8bit",
    "optimizer_args": "weight_decay=0.05 betas=0.9,0.99", "prior_loss_weight": 1.0, "random_crop": False,
    "rank_dropout": 0, "save_every_n_epochs": 2, "save_precision": "fp16", "seed": "1234",
    "shuffle_caption": True, "stop_text_encoder_training": 0, "text_encoder_lr": "5e-05",
    "train_batch_size": 2, "training_comment": "", "unet_lr": "0.0002", "v2": False,
    "v_parameterization": False, "xformers": "xformers",
}

STANDARD_SDXL = {
    "LoRA_type": "Standard", "adaptive_noise_scale": 0, "bucket_reso_steps": 64, "cache_latents": True,
    "cache_latents_to_disk": True, "caption_extension": ".txt", "conv_alpha": 1, "conv_dim": 1,
    "enable_bucket": True, "epoch": 10, "flip_aug": False, "gradient_checkpointing": True,
    "learning_rate": 0.0004, "lr_scheduler": "constant", "lr_warmup": 5, "max_bucket_reso": 2048,
    "max_resolution": "1024,1024", "max_train_steps": "1600", "min_bucket_reso": 512, "min_snr_gamma": 0,
    "mixed_precision": "bf16", "network_alpha": 1, "network_dim": 128, "optimizer": "Adafactor",
    "optimizer_args": "scale_parameter=False relative_step=False warmup_init=False", "sdxl": True,
    "sdxl_no_half_vae": True, "seed": "", "text_encoder_lr": 0, "train_batch_size": 1, "unet_lr": 0.0004,
}


def test_locon_preset_converts_with_alpha_over_rank_kept():
    result = import_kohya_preset(LOCON_SD15, source="locon.json")
    net, train, data = result.config["network"], result.config["train"], result.config["dataset"]
    assert net["type"] == "locon" and net["rank"] == 32 and net["conv_rank"] == 16
    assert net["alpha_ratio"] == 8 / 32 and net["conv_alpha_ratio"] == 4 / 16
    assert net["dropout"] == 0.1 and net["train_unet"] and net["train_text_encoder"]
    assert train["optimizer"] == "adamw8bit" and train["learning_rate"] == 2e-4
    assert train["unet_lr"] == 2e-4 and train["text_encoder_lr"] == 5e-5
    assert train["weight_decay"] == 0.05 and train["optimizer_args"] == {"betas": [0.9, 0.99]}
    assert train["lr_scheduler"] == "cosine_with_restarts" and train["lr_scheduler_num_cycles"] == 3
    assert train["gradient_accumulation_steps"] == 2 and train["epochs"] == 12 and train["seed"] == 1234
    assert train["noise_offset"] == 0.05 and train["min_snr_gamma"] == 5 and train["mixed_precision"] == "bf16"
    assert data["caption_extension"] == ".caption" and data["keep_tokens"] == 1 and data["shuffle_captions"]
    assert data["keep_tokens_separator"] == "|||" and train["scale_weight_norms"] == 1.0
    assert data["resolution"] == 512 and data["min_bucket_side"] == 256 and data["max_bucket_side"] == 1024
    assert data["cache_latents"] == "memory" and data["caption_dropout"] == 0.05 and data["flip"]
    assert data["bucket_no_upscale"] is True and "bucket_no_upscale" not in result.unmapped
    assert result.config["save"] == {"every_epochs": 2, "precision": "fp16"}
    # no counterpart: listed with their values, never dropped silently
    assert {"xformers", "LyCORIS_preset", "noise_offset_type", "color_aug", "v2", "lr_warmup"} <= set(result.unmapped)
    assert train["prior_loss_weight"] == 1.0 and "prior_loss_weight" not in result.unmapped
    assert "reg_data_dir is specific to one run; give it with --set dataset.reg_path=DIR instead." in result.notes
    assert "reg_data_dir" not in result.unmapped  # it has a counterpart: the note names it
    assert ("lora_network_weights is specific to one run; give it with --set network.weights=FILE instead."
            in result.notes)
    assert "dim_from_weights" not in result.unmapped
    assert "vae is specific to one run; give it with --set model.vae=FILE instead." in result.notes
    assert (net["down_lr_weight"], net["up_lr_weight"]) == ("sine+.5", "0,0,0,1") and "mid_lr_weight" not in net
    assert train["noise_offset_random_strength"] and train["adaptive_noise_scale"] == 0.005
    assert (train["min_timestep"], train["max_timestep"]) == (0, 900) and train["zero_terminal_snr"]
    assert data["loss_mask"] == "alpha" and any(n.startswith("masked_loss is imported as") for n in result.notes)
    assert not {"masked_loss", "sdxl_no_half_vae", "v_pred_like_loss", "min_timestep"} & set(result.unmapped)
    assert result.config["model"]["clip_skip"] == 2 and "clip_skip" not in result.unmapped
    assert result.config["model"]["max_token_length"] == 75 and "max_token_length" not in result.unmapped
    assert "learning_rate" not in result.unmapped
    assert any("lr_warmup is 10% of the total steps" in note for note in result.notes)
    text = result.text()
    assert "xformers='xformers'" in text and "model.clip_skip = 2" in text and "network.alpha_ratio = 0.25" in text


def test_standard_sdxl_preset_unet_only_and_warmup_from_steps():
    result = import_kohya_preset(STANDARD_SDXL, source="sdxl.json")
    net, train = result.config["network"], result.config["train"]
    assert net["type"] == "lora" and net["rank"] == 128 and net["alpha_ratio"] == 1 / 128
    assert net["train_unet"] and not net["train_text_encoder"]  # text_encoder_lr 0 with a UNet lr
    assert "conv_rank" not in net and result.unmapped["conv_dim"] == 1  # kohya ignores conv for Standard
    assert train["max_steps"] == 1600 and train["lr_warmup_steps"] == 80  # 5% of 1600
    assert train["optimizer"] == "adafactor" and "min_snr_gamma" not in train  # kohya's 0 = off
    assert train["optimizer_args"] == {"scale_parameter": False, "relative_step": False, "warmup_init": False}
    assert result.config["dataset"]["cache_latents"] == "disk" and result.config["dataset"]["resolution"] == 1024
    assert "seed" not in train and "sdxl" in result.unmapped and "sdxl_no_half_vae" not in result.unmapped  # fp32 VAE


def test_saved_as_a_user_preset_that_resolves(tmp_path, monkeypatch):
    monkeypatch.setenv("SDLORA_HOME", str(tmp_path / "home"))
    source = tmp_path / "EDG LoCon.json"
    source.write_text(json.dumps(LOCON_SD15))
    path, result = import_kohya_file(source, "edg-locon")
    assert path == tmp_path / "home" / "presets" / "edg-locon.toml"
    cfg = resolve_config("edg-locon", ["network.rank=64"])
    # alpha follows r: the imported ratio keeps kohya's scale alpha/r = 8/32 at any rank
    assert cfg.network.resolved_alpha / cfg.network.rank == 0.25 and cfg.network.resolved_alpha == 16
    assert cfg.network.type == "locon" and cfg.train.optimizer == "adamw8bit"
    info = next(p for p in list_presets() if p.name == "edg-locon")
    assert info.source == "user" and info.alpha_ratio == 0.25 and "kohya_ss" in info.description
    # Every imported key is kept, sdlora's defaults too (512 px, batch 1 here): choosing the preset in the UI
    # sets the keys it names, so one left out would keep an earlier preset's value (the demo's 64 px).
    saved = load_preset("edg-locon")
    assert saved["dataset"]["resolution"] == 512 and saved["network"]["train_unet"] is True
    assert saved["network"]["conv_rank"] == 16 and "reg_path" not in saved["dataset"]


def test_lycoris_loha_and_lokr_presets_import_with_their_conv_and_kronecker_settings():
    gui_fields = {"factor": -1, "decompose_both": False, "use_tucker": False}  # saved with every GUI preset
    loha = import_kohya_preset({**STANDARD_SDXL, **gui_fields, "LoRA_type": "LyCORIS/LoHa", "network_dim": "16",
                                "network_alpha": "8", "conv_dim": 8, "conv_alpha": 2}, source="loha.json")
    net = loha.config["network"]
    assert (net["type"], net["rank"], net["alpha_ratio"]) == ("loha", 16, 0.5)
    # conv_dim set: LyCORIS adapts the convolutions too, at their own rank and alpha/r
    assert net["include_convs"] is True and net["conv_rank"] == 8 and net["conv_alpha_ratio"] == 0.25
    assert "factor" not in net and loha.unmapped["factor"] == -1 and loha.unmapped["decompose_both"] is False

    lokr = import_kohya_preset({**STANDARD_SDXL, **gui_fields, "LoRA_type": "LyCORIS/LoKr", "conv_dim": "0",
                                "factor": "4", "decompose_both": "true"}, source="lokr.json")
    net = lokr.config["network"]
    assert (net["type"], net["factor"], net["decompose_both"], net["include_convs"]) == ("lokr", 4, True, False)
    assert "conv_rank" not in net and lokr.unmapped["conv_dim"] == "0" and "factor" not in lokr.unmapped
    assert lokr.unmapped["use_tucker"] is False  # no sdlora counterpart: listed, not dropped


def test_a_lokr_dim_past_any_weight_asks_for_full_halves_and_imports_at_the_top_rank():
    """LyCORIS's idiom (dim 10000 / 100000 = no decomposition, scale 1) would fail sdlora's rank bound."""
    result = import_kohya_preset({**STANDARD_SDXL, "LoRA_type": "LyCORIS/LoKr", "network_dim": 100000,
                                  "network_alpha": 1, "conv_dim": 10000, "conv_alpha": 1}, source="full.json")
    net = result.config["network"]
    assert (net["rank"], net["alpha_ratio"], net["conv_rank"], net["conv_alpha_ratio"]) == (1024, 1.0, 1024, 1.0)
    assert any("network_dim 100000 asks LyCORIS's LoKr for full Kronecker halves" in n for n in result.notes)
    # what that config builds: every tiny SD1 module full on both halves, so its scale is 1 as in LyCORIS
    from networks.network import LoraNetwork
    from tests.helpers import text_encoders
    from trainer.config import config_from_dict
    from trainer.model.tiny_models import build_tiny_pipeline_components

    spec = config_from_dict(result.config, source="full.json").network.spec()
    components = build_tiny_pipeline_components("sd1", seed=0)
    network = LoraNetwork.create("sd1", components["unet"], text_encoders(components), spec)
    assert network.adapters and all(a.full_halves and a.scale == 1.0 for a in network.adapters.values())


def test_unsupported_types_and_bad_values_are_one_sentence(tmp_path):
    with pytest.raises(SdloraError, match=r"LoRA_type 'LyCORIS/iA3' in x.json is not supported; sdlora imports "
                                          r"'Standard', 'LoCon', 'Kohya LoCon', 'LyCORIS/LoCon', 'LyCORIS/LoHa', "
                                          r"'LyCORIS/LoKr', 'LyCORIS/Diag-OFT' presets\."):
        import_kohya_preset({**STANDARD_SDXL, "LoRA_type": "LyCORIS/iA3"}, source="x.json")
    with pytest.raises(SdloraError, match="optimizer 'DAdaptAdam' in x.json is not offered by sdlora"):
        import_kohya_preset({**STANDARD_SDXL, "optimizer": "DAdaptAdam"}, source="x.json")
    with pytest.raises(SdloraError, match="network_dim in x.json is 'big', not a number"):
        import_kohya_preset({**STANDARD_SDXL, "network_dim": "big"}, source="x.json")
    with pytest.raises(SdloraError, match="train.batch_size in the config imported from x.json must be"):
        import_kohya_preset({**STANDARD_SDXL, "train_batch_size": -2}, source="x.json")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(SdloraError, match="broken.json is not a readable kohya_ss JSON preset"):
        read_kohya_preset(broken)


def test_the_train_tabs_upload_names_the_preset_after_the_file_and_says_what_was_left_out(tmp_path, monkeypatch):
    from app.ui.preset_import import SHOWN_UNMAPPED, import_uploaded_kohya

    monkeypatch.setenv("SDLORA_HOME", str(tmp_path / "home"))
    source = tmp_path / "EDG LoCon.json"
    source.write_text(json.dumps(LOCON_SD15))
    name, sentence = import_uploaded_kohya(str(source), "")
    assert name == "edg-locon" and load_preset(name)["network"]["conv_rank"] == 16
    assert sentence.startswith("Imported EDG LoCon.json as preset edg-locon. lr_warmup is 10% of the total steps")
    # the meaningful keys with no counterpart, named; kohya's empty or off fields are not
    assert sentence.endswith(" Not imported, no sdlora counterpart: LyCORIS_preset, lr_warmup, noise_offset_type, "
                             "xformers.")  # not training_comment = "" nor v2 = False
    many = tmp_path / "many.json"
    many.write_text(json.dumps({**LOCON_SD15, **{f"extra_{i}": i + 1 for i in range(10)}}))
    left_out = import_uploaded_kohya(str(many), "")[1].split("Not imported, no sdlora counterpart: ")[1]
    assert left_out.endswith(" and 6 more.") and len(left_out.split(" and ")[0].split(", ")) == SHOWN_UNMAPPED
    assert import_uploaded_kohya(str(source), " mine ")[0] == "mine"
    with pytest.raises(SdloraError, match="'demo' is a built-in preset and cannot be overwritten"):
        import_uploaded_kohya(str(source), "demo")
