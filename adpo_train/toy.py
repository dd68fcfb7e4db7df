"""The built-in toy: a tiny Stable-Diffusion-style model and a procedural preference set.

Everything is built offline from fixed seeds: a tiny ``UNet2DConditionModel``, an
``AutoencoderKL`` (32 px images, trained at 16 px -> 4x8x8 latents), a 2-layer CLIP text encoder with a
CLIP BPE tokenizer written from a synthetic ``vocab.json`` + ``merges.txt``, and a
``DDPMScheduler``; saved as an ordinary diffusers folder so that the trainer loads it
through the same code path as a real model.

Like the model DPO is meant for, the toy is "pretrained" before the preference run: the
VAE is trained as an autoencoder of toy images (:func:`pretrain_vae`) and gets a
near-deterministic posterior and a unit-variance ``scaling_factor`` (:func:`calibrate_vae`),
and the UNet is trained for ``PRETRAIN_STEPS`` steps as a text-conditioned denoiser of
captioned toy images (:func:`pretrain_unet`; both together about a minute on one CPU thread).
Without the UNet's pre-training the implicit accuracy of the default run stays at 0.5;
without the VAE's, every generated image is coloured noise.  Like a real base model, the toy
follows its prompt only in part: a quarter of its pre-training images show the shape in
another colour than the caption's, so it draws shapes but often in a wrong colour, which is
what the preference set (and ``--reward toy``) prefers against.  A toy model folder records
its recipe (:data:`RECIPE_FILE`); a folder built with another recipe is rebuilt.

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
RESOLUTION = 16  # training resolution (4x8x8 latents)
IMAGE_SIZE = 32  # size of the dataset's images; the cache resizes them to the training resolution
MAX_TOKENS = 16
# Pre-training of the toy UNet (see pretrain_unet): optimiser steps, batch size, learning rate.
# ADPO_TOY_PRETRAIN_STEPS overrides the step count (the test suite shortens it: it checks the
# plumbing, and the 600 steps cost about a minute per toy build).
PRETRAIN_STEPS = 600
PRETRAIN_BATCH = 32
PRETRAIN_LR = 1e-3
PRETRAIN_IMAGES = 512
# Of the pre-training images, the fraction drawn in the caption's colour (the rest in another palette
# colour, as the preference set's losers) and the fraction whose caption is dropped (the empty prompt,
# as SD is trained: classifier-free guidance then has an unconditional prediction to start from).
PRETRAIN_COLOR_MATCH = 0.75
PRETRAIN_CAPTION_DROPOUT = 0.1
# Pre-training of the toy VAE as an autoencoder (see pretrain_vae), capped by the UNet's step count
# (so ADPO_TOY_PRETRAIN_STEPS shortens both): without it the random decoder turns every latent into
# coloured noise, and no image-space reward can see what the UNet learned.
VAE_PRETRAIN_STEPS = 200
VAE_PRETRAIN_LR = 2e-3
# A toy model folder's recipe (see toy_recipe); bump RECIPE_VERSION whenever the code that builds the
# toy changes what it builds, so that a folder built by an older version is rebuilt, not reused.
RECIPE_FILE = "adpo_toy_recipe.json"
RECIPE_VERSION = 2


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


def _vocab_and_merges(words=None) -> tuple[dict, list]:
    """The toy tokenizer's ``vocab.json`` and ``merges.txt`` lines: byte-level characters plus
    whole-word merges for ``words``."""
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
    return vocab, merges


def write_tokenizer(path: str, words=None, max_tokens: int = MAX_TOKENS) -> None:
    """A CLIP tokenizer folder: byte-level characters plus whole-word merges for ``words``."""
    vocab, merges = _vocab_and_merges(words)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "vocab.json"), "w") as f:
        json.dump(vocab, f)
    with open(os.path.join(path, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "CLIPTokenizer", "model_max_length": max_tokens,
                   "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
                   "pad_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}, f)


def build_toy_components(tokenizer_dir: str, seed: int = 0, prediction_type: str = "epsilon",
                         pretrain_steps: int = 0, log=None, max_tokens: int = MAX_TOKENS):
    """``dict(unet, vae, text_encoder, tokenizer, scheduler)``, randomly initialised from ``seed``;
    ``pretrain_steps > 0``: the UNet is then pre-trained on captioned toy images (:func:`pretrain_unet`)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from .models import sd_scheduler

    if log:
        log("toy model: building the tiny VAE (calibrated), text encoder and UNet, once (reused afterwards)")
    write_tokenizer(tokenizer_dir, max_tokens=max_tokens)
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
    if pretrain_steps > 0:
        pretrain_vae(vae, min(pretrain_steps, VAE_PRETRAIN_STEPS), seed=seed, log=log)
    calibrate_vae(vae, seed)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_attention_heads=4,
        num_hidden_layers=2, max_position_embeddings=max_tokens, layer_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))
    scheduler = sd_scheduler(prediction_type, steps_offset=1)
    parts = dict(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)
    if pretrain_steps > 0:
        pretrain_unet(parts, pretrain_steps, seed=seed, log=log)
    return parts


def pretrain_unet(parts: dict, steps: int = PRETRAIN_STEPS, batch_size: int = PRETRAIN_BATCH,
                  lr: float = PRETRAIN_LR, num_images: int = PRETRAIN_IMAGES, seed: int = 0, log=None,
                  color_match: float = None, caption_dropout: float = None) -> list[float]:
    """Pre-train the toy UNet as a text-conditioned denoiser (the ordinary diffusion loss) on
    ``num_images`` captioned toy images, drawn from a seed of their own (not the preference set's):
    each shows the named shape, in the named colour with probability ``color_match`` (default
    :data:`PRETRAIN_COLOR_MATCH`) and else in another palette colour; a fraction ``caption_dropout``
    (:data:`PRETRAIN_CAPTION_DROPOUT`) of the captions is the empty prompt.  Returns the loss per step.

    DPO fine-tunes a model that already denoises and follows its prompt; from a random UNet
    the LoRA has no useful features to steer, and the implicit accuracy stays at 0.5.  A base
    that always drew the caption's colour would leave the preference set nothing to teach: with
    ``color_match=1`` 97% of the demo's evaluation images had the caption's colour as their main
    palette colour, with 0.75 about 44% (guidance 7.5, 10 steps; docs/trainer.md).
    """
    import torch

    from .conditioning import tokenize

    unet, vae, te, tok, sched = (parts[k] for k in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"))
    color_match = PRETRAIN_COLOR_MATCH if color_match is None else color_match
    caption_dropout = PRETRAIN_CAPTION_DROPOUT if caption_dropout is None else caption_dropout
    rng = np.random.default_rng(seed + 2000)
    names = list(COLORS)
    captions, imgs = [], []
    for _ in range(num_images):
        color, shape = names[rng.integers(len(names))], SHAPES[rng.integers(len(SHAPES))]
        drawn = color
        if rng.random() >= color_match:  # another palette colour, as the preference set's losers
            drawn = names[(names.index(color) + 1 + rng.integers(len(names) - 1)) % len(names)]
        captions.append("" if rng.random() < caption_dropout else f"a {color} {shape}")
        imgs.append(draw(drawn, shape, rng, RESOLUTION))
    with torch.no_grad():
        x = torch.tensor(np.stack(imgs)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        lat = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
        text = te(tokenize(tok, captions), return_dict=False)[0]
    gen = torch.Generator().manual_seed(seed + 3000)
    unet.train().requires_grad_(True)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr, weight_decay=0.0)
    v_pred = sched.config.prediction_type == "v_prediction"
    losses = []
    if log:
        log(f"toy model: pre-training the UNet as a denoiser ({steps} steps)")
    for step in range(steps):
        idx = torch.randint(0, num_images, (batch_size,), generator=gen)
        x0 = lat[idx]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, sched.config.num_train_timesteps, (batch_size,), generator=gen)
        target = sched.get_velocity(x0, noise, t) if v_pred else noise
        pred = unet(sched.add_noise(x0, noise, t), t, text[idx], return_dict=False)[0]
        loss = torch.nn.functional.mse_loss(pred, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if log and (step + 1) % max(steps // 10, 1) == 0:
            log(f"toy model: pre-training step {step + 1}/{steps}, loss {losses[-1]:.4f}")
    unet.requires_grad_(False).eval()
    return losses


def pretrain_vae(vae, steps: int = VAE_PRETRAIN_STEPS, batch_size: int = PRETRAIN_BATCH, lr: float = VAE_PRETRAIN_LR,
                 num_images: int = PRETRAIN_IMAGES, seed: int = 0, log=None) -> list[float]:
    """Train the toy VAE as an autoencoder: ``decode(encode(x).mean) ~ x`` (mean squared error) on
    ``num_images`` toy images at the training resolution, drawn from a seed of their own.  Returns the
    loss per step.

    A real base model's VAE decodes its latents into images; a random one does not (its decoder maps
    the latent of a red circle to coloured noise), so no reward on the pipeline's images could tell a
    better UNet from a worse one.  The grey background's pixel noise (std 20 of 255) is not
    reconstructed: its mean squared error in [-1, 1] units, ~0.025, is the floor of the loss.
    """
    import torch

    rng = np.random.default_rng(seed + 4000)
    names = list(COLORS)
    imgs = [draw(names[rng.integers(len(names))], SHAPES[rng.integers(len(SHAPES))], rng, RESOLUTION)
            for _ in range(num_images)]
    x_all = torch.tensor(np.stack(imgs)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    gen = torch.Generator().manual_seed(seed + 5000)
    vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    if log:
        log(f"toy model: pre-training the VAE as an autoencoder ({steps} steps)")
    for step in range(steps):
        x = x_all[torch.randint(0, num_images, (batch_size,), generator=gen)]
        loss = torch.nn.functional.mse_loss(vae.decode(vae.encode(x).latent_dist.mean).sample, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        if log and (step + 1) % max(steps // 4, 1) == 0:
            log(f"toy model: VAE pre-training step {step + 1}/{steps}, loss {losses[-1]:.4f}")
    vae.requires_grad_(False).eval()
    return losses


def calibrate_vae(vae, seed: int = 0, num_images: int = 72) -> None:
    """Give the random VAE what a trained one has: a near-deterministic posterior and a
    ``scaling_factor`` that brings the toy images' latents to unit variance.

    A freshly initialised ``AutoencoderKL`` predicts ``logvar ~ 0``, so every latent sample
    carries noise of std ~1 against a mean of std ~0.25, and the default ``scaling_factor``
    (SD's 0.18215) shrinks what is left far below the diffusion noise: the colour of the
    shape is then invisible to the UNet.  SD's VAE has a posterior std far below its
    latents' spread, and its scaling factor is 1 / std of its latents; do the same here.
    """
    import torch

    with torch.no_grad():
        qc = vae.quant_conv
        c = qc.out_channels // 2
        qc.weight[c:].zero_()
        qc.bias[c:].fill_(-12.0)  # posterior std e^-6 ~ 0.0025
        rng = np.random.default_rng(seed + 1000)
        names = list(COLORS)
        imgs = [draw(names[i % len(names)], SHAPES[i % len(SHAPES)], rng, RESOLUTION) for i in range(num_images)]
        x = torch.tensor(np.stack(imgs)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        mean = vae.encode(x).latent_dist.mean
    vae.register_to_config(scaling_factor=float(1.0 / mean.std()))


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


def build_toy_pipeline(tokenizer_dir: str, seed: int = 0, prediction_type: str = "epsilon",
                       pretrain_steps: int = 0, log=None, max_tokens: int = MAX_TOKENS):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline(**build_toy_components(tokenizer_dir, seed, prediction_type, pretrain_steps, log,
                                                          max_tokens),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)


def toy_recipe(seed: int = 0, prediction_type: str = "epsilon", kind: str = "sd15", pretrain_steps: int = 0,
               max_tokens: int = MAX_TOKENS) -> dict:
    """What a toy model folder is built from: the arguments of :func:`write_toy_model`, the
    pre-training constants and :data:`RECIPE_VERSION` (the code's own version of the recipe)."""
    pre = dict(unet_steps=pretrain_steps, vae_steps=min(pretrain_steps, VAE_PRETRAIN_STEPS), batch=PRETRAIN_BATCH,
               unet_lr=PRETRAIN_LR, vae_lr=VAE_PRETRAIN_LR, images=PRETRAIN_IMAGES, color_match=PRETRAIN_COLOR_MATCH,
               caption_dropout=PRETRAIN_CAPTION_DROPOUT) if kind != "sdxl" and pretrain_steps > 0 else {}
    return dict(version=RECIPE_VERSION, seed=seed, prediction_type=prediction_type, kind=kind, max_tokens=max_tokens,
                resolution=RESOLUTION, pretrain=pre)


def _read_recipe(path: str):
    try:
        with open(os.path.join(path, RECIPE_FILE)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _is_toy_folder(path: str) -> bool:
    """A folder this package wrote as a toy model: it has a recipe, or (built before recipes were
    recorded) the toy's synthetic tokenizer vocabulary, which no other model folder has."""
    if _read_recipe(path) is not None:
        return True
    try:
        with open(os.path.join(path, "tokenizer", "vocab.json")) as f:
            have = set(json.load(f))
    except (OSError, ValueError, TypeError):
        return False
    return have == set(_vocab_and_merges()[0])


def write_toy_model(path: str, seed: int = 0, prediction_type: str = "epsilon", kind: str = "sd15",
                    pretrain_steps: int | None = None, log=None, max_tokens: int = MAX_TOKENS) -> str:
    """Save the toy model as a diffusers-format folder (``model_index.json``, one subfolder per part,
    and its recipe in :data:`RECIPE_FILE`); the SD1.5-style VAE and UNet are pre-trained
    (:func:`pretrain_vae`, :func:`pretrain_unet`; ``pretrain_steps`` default: ``ADPO_TOY_PRETRAIN_STEPS``
    or :data:`PRETRAIN_STEPS`).  ``kind="sdxl"``: the SDXL-style toy (a ``StableDiffusionXLPipeline``
    folder, random UNet).  A folder with the same recipe is reused; a toy folder with another recipe
    (another version of this code, other pre-training steps) is rebuilt; any other folder is refused."""
    from . import safedir

    if pretrain_steps is None:
        pretrain_steps = int(os.environ.get("ADPO_TOY_PRETRAIN_STEPS", PRETRAIN_STEPS))
    recipe = toy_recipe(seed, prediction_type, kind, pretrain_steps, max_tokens)
    if os.path.isfile(os.path.join(path, "model_index.json")):
        if _read_recipe(path) == recipe:
            return path
        if not (_is_toy_folder(path) or safedir.owned(path)):
            from .errors import UserError

            raise UserError(f"make-toy: {path!r} holds a model that is not the toy; refusing to replace it")
        if log:
            log(f"toy model: {path} was built with another recipe; rebuilding it")
    else:
        safedir.check_replaceable(path, "make-toy")  # never replace a folder the package did not write
    tmp = path.rstrip("/") + ".tmp"
    if kind == "sdxl":
        from diffusers import StableDiffusionXLPipeline

        pipe = StableDiffusionXLPipeline(**build_toy_sdxl_components(os.path.join(tmp, "tokenizer"), seed,
                                                                     prediction_type))
    else:
        pipe = build_toy_pipeline(os.path.join(tmp, "tokenizer"), seed, prediction_type, pretrain_steps, log,
                                  max_tokens)
    pipe.save_pretrained(tmp, safe_serialization=True)
    with open(os.path.join(tmp, RECIPE_FILE), "w") as f:
        json.dump(recipe, f, indent=1)
    os.replace(tmp, path) if not os.path.exists(path) else _replace_dir(tmp, path)
    return path


def _replace_dir(src: str, dst: str) -> None:
    import shutil

    shutil.rmtree(dst)
    os.replace(src, dst)


def draw(color: str, shape: str, rng: np.random.Generator, size: int = IMAGE_SIZE) -> np.ndarray:
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


def _is_toy_dataset(path: str) -> bool:
    import pyarrow.parquet as pq

    try:
        return pq.read_schema(path).metadata.get(b"adpo-train") == b"toy dataset"
    except Exception:  # noqa: BLE001 - unreadable or no metadata: not ours
        return False


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
                      "user_id": pa.array(cols["user_id"], pa.int64())},
                     metadata={"adpo-train": "toy dataset"})
    if os.path.lexists(path) and not _is_toy_dataset(path):
        from .errors import UserError

        raise UserError(f"make-toy: {path!r} exists and is not the toy dataset; refusing to overwrite it")
    tmp = path + ".tmp"
    pq.write_table(table, tmp)
    os.replace(tmp, path)
    return path
