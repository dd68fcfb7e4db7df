"""Conditioning: what turns a caption and an image into UNet inputs, shared by the dataset
(:mod:`adpo_train.data`), the latent cache (:mod:`adpo_train.cache`) and the training step
(:mod:`adpo_train.step`).

* :func:`tokenize`: a CLIP tokenizer's ids, padded to its ``model_max_length``;
* :class:`TextEncoders`: SD1.5's one CLIP text encoder, or SDXL's two (penultimate hidden states
  concatenated, plus the pooled, projected embedding), frozen;
* :func:`time_ids`: SDXL's micro-conditioning per image;
* :func:`encode_images`: scaled VAE latent samples of both images of each pair.

Depends on :mod:`adpo_train.models` (local-folder checks) only; nothing here imports the data or
cache modules.
"""
from __future__ import annotations

from typing import Optional

import torch

from .models import check_local_model, is_sdxl_folder


def tokenize(tokenizer, captions: list[str]) -> torch.Tensor:
    return tokenizer(captions, max_length=tokenizer.model_max_length, padding="max_length", truncation=True,
                     return_tensors="pt").input_ids


def load_text_encoders(path: str, variant: Optional[str] = None):
    """``TextEncoders`` (one for SD1.5-style folders, two for SDXL-style folders), frozen."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    check_local_model(path)
    kw = dict(variant=variant, local_files_only=True, use_safetensors=True)
    te1 = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **kw)
    tok1 = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", local_files_only=True)
    te2 = tok2 = None
    if is_sdxl_folder(path):
        te2 = CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2", **kw)
        tok2 = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2", local_files_only=True)
    return TextEncoders(te1, tok1, te2, tok2)


class TextEncoders:
    """SD1.5: the last hidden state of one CLIP encoder.  SDXL (as diffusers' SDXL pipelines and
    training scripts do): the penultimate hidden states of both encoders, concatenated on the
    feature axis, plus the second encoder's pooled, projected embedding."""

    def __init__(self, te1, tok1, te2=None, tok2=None):
        self.te1, self.tok1, self.te2, self.tok2 = te1, tok1, te2, tok2
        for m in (te1, te2):
            if m is not None:
                m.requires_grad_(False).eval()

    @property
    def sdxl(self) -> bool:
        return self.te2 is not None

    def to(self, device, dtype=None):
        for m in (self.te1, self.te2):
            if m is not None:
                m.to(device, dtype=dtype)
        return self

    def tokenize(self, captions: list[str]) -> dict[str, torch.Tensor]:
        ids = {"input_ids": tokenize(self.tok1, captions)}
        if self.sdxl:
            ids["input_ids_2"] = tokenize(self.tok2, captions)
        return ids

    @torch.no_grad()
    def encode(self, input_ids: torch.Tensor, input_ids_2: Optional[torch.Tensor] = None):
        """``(text (n, L, D), pooled (n, P) or None)``."""
        dev = self.te1.device
        if not self.sdxl:
            return self.te1(input_ids.to(dev), return_dict=False)[0], None
        h1 = self.te1(input_ids.to(dev), output_hidden_states=True).hidden_states[-2]
        o2 = self.te2(input_ids_2.to(dev), output_hidden_states=True)
        return torch.cat([h1, o2.hidden_states[-2]], dim=-1), o2.text_embeds


def time_ids(original_hw, crop_top_left, target: int) -> torch.Tensor:
    """SDXL micro-conditioning: ``(orig_h, orig_w, crop_top, crop_left, target_h, target_w)``."""
    return torch.tensor([*original_hw, *crop_top_left, target, target], dtype=torch.float32)


@torch.no_grad()
def encode_images(vae, pixels: torch.Tensor, generator: torch.Generator, chunk: int | None = None) -> torch.Tensor:
    """``(n, 2, 3, R, R)`` pixels -> ``(n, 2, C, h, w)`` scaled latent samples, ``chunk`` images per VAE
    call (``--vae_encode_batch_size``)."""
    n = pixels.shape[0]
    flat = pixels.reshape(n * 2, *pixels.shape[2:]).to(vae.device, vae.dtype)
    chunk = chunk or flat.shape[0]
    lat = torch.cat([vae.encode(flat[i:i + chunk]).latent_dist.sample(generator=generator)
                     for i in range(0, flat.shape[0], chunk)]) * vae.config.scaling_factor
    return lat.reshape(n, 2, *lat.shape[1:])
