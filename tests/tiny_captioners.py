"""Tiny random-weight captioners saved as the folders `hf download` writes, built offline from configs:
BLIP (a BERT word-piece tokenizer from a small vocab), Florence-2 (a byte-level BART tokenizer) and a
WD14-style ONNX tagger whose probabilities are fixed numbers, so thresholds can be asserted exactly."""
from __future__ import annotations

import csv
import math
from pathlib import Path

import torch

WORDS = ["a", "photo", "of", "red", "blue", "circle", "square", "cat", "on", "the", "white", "background"]


def tiny_blip(folder: Path) -> Path:
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipProcessor
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    folder.mkdir(parents=True, exist_ok=True)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tokenizer = BertTokenizer(str(vocab))
    processor = BlipProcessor(BlipImageProcessorPil(size={"height": 32, "width": 32}), tokenizer)
    layers = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    config = BlipConfig(
        vision_config=dict(layers, image_size=32, patch_size=8),
        text_config=dict(layers, vocab_size=len(tokenizer), max_position_embeddings=64, encoder_hidden_size=16,
                         bos_token_id=2, pad_token_id=0, sep_token_id=3, eos_token_id=3),
        projection_dim=16)
    torch.manual_seed(0)
    BlipForConditionalGeneration(config).save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def tiny_florence2(folder: Path) -> Path:
    from transformers import (
        BartTokenizer,
        Florence2Config,
        Florence2ForConditionalGeneration,
        Florence2Processor,
    )
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    # Printable ASCII and byte-level BPE's space ("Ġ"): whatever random weights generate decodes to readable text.
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    vocab = {token: i for i, token in enumerate(specials + [chr(c) for c in range(33, 127)] + ["\u0120"])}
    tokenizer = BartTokenizer(vocab=vocab, merges=[], extra_special_tokens={"image_token": "<image>"})
    # 32 px through strides 4 and 2: 4 x 4 spatial tokens and one temporal token.
    images = CLIPImageProcessorPil(size={"height": 32, "width": 32}, do_center_crop=False, image_seq_length=17)
    config = Florence2Config(
        vision_config=dict(depths=[1, 1], patch_size=[7, 3], patch_stride=[4, 2], patch_padding=[3, 1],
                           patch_prenorm=[False, True], embed_dim=[8, 16], num_heads=[1, 2], num_groups=[1, 2],
                           window_size=2, projection_dim=16, max_position_embeddings=8, max_temporal_embeddings=4),
        text_config=dict(model_type="bart", vocab_size=len(tokenizer), d_model=16, encoder_layers=1,
                         decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                         decoder_ffn_dim=32, max_position_embeddings=128, bos_token_id=0, pad_token_id=1,
                         eos_token_id=2, decoder_start_token_id=2, forced_bos_token_id=0),
        image_token_id=tokenizer.image_token_id)
    torch.manual_seed(0)
    Florence2ForConditionalGeneration(config).save_pretrained(folder)
    Florence2Processor(images, tokenizer).save_pretrained(folder)
    return folder


# (name, category, probability): fixed, or "blue"/"red" for a tag that follows the image's mean colour.
WD14_TAGS = [
    ("general", "9", 0.95), ("sensitive", "9", 0.05),
    ("blue_background", "0", "blue"), ("red_theme", "0", "red"),
    ("simple_background", "0", 0.5), ("solo", "0", 0.3), ("^_^", "0", 0.9),
    ("some_character_(series)", "4", 0.9), ("other_character", "4", 0.6),
]
SIDE = 16


def tiny_wd14(folder: Path) -> Path:
    """An ONNX tagger in SmilingWolf's layout: [batch, 16, 16, 3] BGR 0-255 in, one sigmoid per CSV row out.
    A colour tag's logit is 20 * (mean channel / 255) - 10: ~1 for a pure blue (red) image, ~0 otherwise."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    folder.mkdir(parents=True, exist_ok=True)
    weights, bias = np.zeros((3, len(WD14_TAGS)), np.float32), np.zeros(len(WD14_TAGS), np.float32)
    for column, (_, _, probability) in enumerate(WD14_TAGS):
        if isinstance(probability, str):
            weights[{"blue": 0, "red": 2}[probability], column] = 20 / 255  # BGR: blue is channel 0
            bias[column] = -10
        else:
            bias[column] = math.log(probability / (1 - probability))
    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["input"], ["mean"], axes=[1, 2], keepdims=0),
         helper.make_node("MatMul", ["mean", "weights"], ["logits"]),
         helper.make_node("Add", ["logits", "bias"], ["shifted"]),
         helper.make_node("Sigmoid", ["shifted"], ["output"])],
        "tiny_tagger",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", SIDE, SIDE, 3])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", len(WD14_TAGS)])],
        [numpy_helper.from_array(weights, "weights"), numpy_helper.from_array(bias, "bias")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(folder / "model.onnx"))
    with open(folder / "selected_tags.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["tag_id", "name", "category", "count"])
        writer.writerows([i, name, category, 100] for i, (name, category, _) in enumerate(WD14_TAGS))
    return folder
