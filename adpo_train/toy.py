"""The built-in toy: a tiny Stable-Diffusion-style model and a procedural preference set.

Everything is built offline from fixed seeds: a tiny ``UNet2DConditionModel``, an
``AutoencoderKL`` (32 px images -> 4x16x16 latents), a 2-layer CLIP text encoder with a
CLIP BPE tokenizer written from a synthetic ``vocab.json`` + ``merges.txt``, and a
``DDPMScheduler``; saved as an ordinary diffusers folder so that the trainer loads it
through the same code path as a real model.

The preference set follows the Pick-a-Pic v2 schema (``jpg_0``, ``jpg_1``, ``label_0``,
``caption``, ``user_id``).  Each caption names a colour and a shape ("a red circle"); the
preferred image draws that shape in that colour, the other draws it in a wrong colour.
A few ties and one corrupt image are included on purpose, so the default run shows
the trainer dropping and counting them.
"""
from __future__ import annotations

import io
import json
import os

import numpy as np

COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40),
          "purple": (150, 50, 190), "orange": (240, 140, 30)}
SHAPES = ("circle", "square", "triangle")
RESOLUTION = 32
MAX_TOKENS = 16


def _bytes_to_unicode() -> list[str]:
    """The byte -> printable-character table of byte-level BPE (GPT-2 / CLIP)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return [chr(c) for c in cs]


def write_tokenizer(path: str, words=None) -> None:
    """A CLIP tokenizer folder: byte-level characters plus whole-word merges for ``words``."""
    words = list(words or (list(COLORS) + list(SHAPES) + ["a", "an", "of", "photo"]))
    chars = _bytes_to_unicode()
    vocab: dict[str, int] = {}
    for c in chars:
        vocab[c] = len(vocab)
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    merges: list[str] = []
    for w in words:
        cur = w[0]
        for i, ch in enumerate(w[1:]):
            right = ch + ("</w>" if i == len(w) - 2 else "")
            merges.append(f"{cur} {right}")
            cur += right
            vocab.setdefault(cur, len(vocab))
    merges = list(dict.fromkeys(merges))
    for t in ("<|startoftext|>", "<|endoftext|>"):
        vocab[t] = len(vocab)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(path, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "CLIPTokenizer", "model_max_length": MAX_TOKENS,
                   "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                   "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}, f)


def build_toy_components(tokenizer_dir: str, seed: int = 0, prediction_type: str = "epsilon"):
    """``dict(unet, vae, text_encoder, tokenizer, scheduler)``, randomly initialised from ``seed``."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    write_tokenizer(tokenizer_dir)
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=RESOLUTION // 2, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32, attention_head_dim=8,
        norm_num_groups=32)
    torch.manual_seed(seed + 1)
    vae = AutoencoderKL(block_out_channels=(32, 64), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=32, sample_size=RESOLUTION)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_attention_heads=4,
        num_hidden_layers=2, max_position_embeddings=MAX_TOKENS, layer_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", prediction_type=prediction_type, clip_sample=False,
                              steps_offset=1)
    return dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)


def build_toy_sdxl_components(tokenizer_dir: str, seed: int = 0, prediction_type: str = "epsilon"):
    """The SDXL-style toy: the toy VAE and scheduler, two 32-wide CLIP encoders (the second with a
    32-wide projection: the pooled embedding) and the ``tiny-sdxl`` UNet (``addition_embed_type
    ="text_time"``: pooled text + 6 micro-conditioning time ids)."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer

    from .models import UNET_CONFIGS

    parts = build_toy_components(tokenizer_dir, seed, prediction_type)
    tok = parts["tokenizer"]
    torch.manual_seed(seed + 3)
    parts["unet"] = UNet2DConditionModel(**UNET_CONFIGS["tiny-sdxl"])
    torch.manual_seed(seed + 4)
    parts["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
        max_position_embeddings=MAX_TOKENS, layer_norm_eps=1e-5, projection_dim=32, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    parts["tokenizer_2"] = CLIPTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    return parts


def build_toy_pipeline(tokenizer_dir: str, seed: int = 0, prediction_type: str = "epsilon"):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(**build_toy_components(tokenizer_dir, seed, prediction_type),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def write_toy_model(path: str, seed: int = 0, prediction_type: str = "epsilon", kind: str = "sd15") -> str:
    """Save the toy model as a diffusers-format folder (``model_index.json``, one subfolder per part);
    ``kind="sdxl"``: the SDXL-style toy (a ``StableDiffusionXLPipeline`` folder)."""
    if os.path.isfile(os.path.join(path, "model_index.json")):
        return path
    tmp = path.rstrip("/") + ".tmp"
    if kind == "sdxl":
        from diffusers import StableDiffusionXLPipeline

        pipe = StableDiffusionXLPipeline(**build_toy_sdxl_components(os.path.join(tmp, "tokenizer"), seed,
                                                                     prediction_type))
    else:
        pipe = build_toy_pipeline(os.path.join(tmp, "tokenizer"), seed, prediction_type)
    pipe.save_pretrained(tmp, safe_serialization=True)
    os.replace(tmp, path) if not os.path.exists(path) else _replace_dir(tmp, path)
    return path


def _replace_dir(src: str, dst: str) -> None:
    import shutil

    shutil.rmtree(dst)
    os.replace(src, dst)


def draw(color: str, shape: str, rng: np.random.Generator, size: int = RESOLUTION) -> np.ndarray:
    """An ``(size, size, 3)`` uint8 image: a coloured shape on a noisy grey background."""
    img = np.clip(rng.normal(128, 20, (size, size, 3)), 0, 255)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    cy, cx = rng.uniform(size * 0.35, size * 0.65, 2)
    r = rng.uniform(size * 0.2, size * 0.3)
    if shape == "circle":
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    elif shape == "square":
        mask = (np.abs(yy - cy) <= r * 0.85) & (np.abs(xx - cx) <= r * 0.85)
    else:
        mask = (yy >= cy - r) & (yy <= cy + r) & (np.abs(xx - cx) <= (yy - (cy - r)) * 0.6)
    img[mask] = COLORS[color]
    return img.astype(np.uint8)


def _png(img: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def toy_records(num_pairs: int, seed: int = 0, num_ties: int = 2, num_corrupt: int = 1) -> dict[str, list]:
    """Pick-a-Pic-schema columns: ``num_pairs`` preference pairs, then ties and corrupt rows."""
    rng = np.random.default_rng(seed)
    names = list(COLORS)
    cols: dict[str, list] = {"caption": [], "jpg_0": [], "jpg_1": [], "label_0": [], "user_id": []}
    total = num_pairs + num_ties + num_corrupt
    for i in range(total):
        color, shape = names[rng.integers(len(names))], SHAPES[rng.integers(len(SHAPES))]
        wrong = names[(names.index(color) + 1 + rng.integers(len(names) - 1)) % len(names)]
        good, bad = _png(draw(color, shape, rng)), _png(draw(wrong, shape, rng))
        winner_first = bool(rng.integers(2))
        label = 1.0 if winner_first else 0.0
        if num_pairs <= i < num_pairs + num_ties:
            label = 0.5
        if i >= num_pairs + num_ties:
            good = b"\x89PNG-not-really-an-image"
        cols["caption"].append(f"a {color} {shape}")
        cols["jpg_0"].append(good if winner_first else bad)
        cols["jpg_1"].append(bad if winner_first else good)
        cols["label_0"].append(label)
        cols["user_id"].append(int(rng.integers(100)))
    return cols


def write_toy_dataset(path: str, num_pairs: int = 256, seed: int = 0, num_ties: int = 2,
                      num_corrupt: int = 1) -> str:
    """Write the toy preference set as one Pick-a-Pic-schema parquet file; returns its path."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    cols = toy_records(num_pairs, seed, num_ties, num_corrupt)
    table = pa.table({"caption": pa.array(cols["caption"], pa.string()),
                      "jpg_0": pa.array(cols["jpg_0"], pa.binary()), "jpg_1": pa.array(cols["jpg_1"], pa.binary()),
                      "label_0": pa.array(cols["label_0"], pa.float64()),
                      "user_id": pa.array(cols["user_id"], pa.int64())})
    tmp = path + ".tmp"
    pq.write_table(table, tmp)
    os.replace(tmp, path)
    return path
