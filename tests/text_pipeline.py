"""A tiny Stable-Diffusion-layout pipeline and a tiny captioned image folder, written in the test as diffusers' own
pipeline tests do (tiny configs, a tokenizer from a vocabulary written here): nothing is downloaded."""

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

WORDS = ["a", "red", "blue", "square", "circle", "on", "the", "left", "right"]
TEXT_WIDTH = 24  # the CLIP text encoder's hidden size = the UNet's cross_attention_dim


def clip_vocabulary() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A CLIP-style BPE vocabulary (the special tokens, every letter, with and without the end-of-word mark) and the
    merges that spell WORDS as whole tokens."""
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for letter in "abcdefghijklmnopqrstuvwxyz":
        vocab.setdefault(letter, len(vocab))
        vocab.setdefault(letter + "</w>", len(vocab))
    merges = []
    for word in WORDS:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            pair = (pieces[0], pieces[1])
            if pair not in merges:
                merges.append(pair)
                vocab.setdefault(pair[0] + pair[1], len(vocab))
            pieces = [pair[0] + pair[1], *pieces[2:]]
    return vocab, merges


def write_tokenizer_files(directory: Path) -> Path:
    """A CLIP tokenizer as transformers 4 saved it (and the Stable Diffusion pipelines on the Hub hold it):
    vocab.json, merges.txt and tokenizer_config.json."""
    vocab, merges = clip_vocabulary()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}))
    return directory


def text_pipeline(directory, *, scheduler=None) -> Path:
    """Write a tiny StableDiffusionPipeline with save_pretrained: an AutoencoderKL (3-channel 16x16 images <-> 4-channel
    8x8 latents), a UNet2DConditionModel with cross-attention in its lower block and the mid block, a CLIP text
    encoder and tokenizer, and a DDPMScheduler. Returns the directory."""
    from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    directory = Path(directory)
    vocab, merges = clip_vocabulary()
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_WIDTH, attention_head_dim=4, norm_num_groups=8)
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 8), latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=4, sample_size=16, scaling_factor=0.5)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=TEXT_WIDTH, intermediate_size=37,
        num_attention_heads=4, num_hidden_layers=2, vocab_size=len(vocab), max_position_embeddings=77))
    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77)
    # steps_offset and clip_sample as StableDiffusionPipeline would otherwise rewrite them (with a warning)
    scheduler = scheduler or DDPMScheduler(num_train_timesteps=1000, steps_offset=1, clip_sample=False)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(directory)
    return directory


def captioned_folder(directory, count: int = 24) -> Path:
    """16x16 RGB images of a red square or a blue circle (class subfolders red/ and blue/, so the report's FID
    classifier has labels) at seeded positions, captioned in a metadata.jsonl at the top."""
    directory = Path(directory)
    rng = np.random.default_rng(0)
    lines = []
    yy, xx = np.mgrid[:16, :16]
    for i in range(count):
        red = i % 2 == 0
        cx, cy = rng.integers(5, 11, size=2)
        image = np.full((16, 16, 3), 255, dtype=np.uint8)
        inside = (np.abs(xx - cx) <= 3) & (np.abs(yy - cy) <= 3) if red else (xx - cx) ** 2 + (yy - cy) ** 2 <= 12
        image[inside] = (220, 30, 30) if red else (30, 30, 220)
        name = f"{'red' if red else 'blue'}/{i:03d}.png"
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(directory / name)
        caption = f"a {'red square' if red else 'blue circle'} on the {'left' if cx < 8 else 'right'}"
        lines.append(json.dumps({"file_name": name, "text": caption}))
    (directory / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return directory
