"""``adpo-train cache``: precompute VAE latents of both images and the text embeddings.

Output folder: ``shard-NNNNN.safetensors`` files with ``latents`` ``(n, 2, C, h, w)``
(winner, loser; already multiplied by the VAE scaling factor), ``text`` ``(n, L, D)``
(last hidden state of the text encoder; SDXL: both encoders' penultimate states,
concatenated), ``flipped`` ``(n,)`` and ``row`` ``(n,)`` (row in the source table); SDXL
models (a ``text_encoder_2`` folder) add ``pooled`` ``(n, P)`` (the second encoder's
projected embedding) and ``time_ids`` ``(n, 2, 6)`` (per image: original size, crop
top-left, target size), plus ``index.json`` (shards, counts of ties and corrupt pairs,
the flip record, the model, the resolution).  The folder is written under
``<out>.tmp`` and renamed when complete; it carries a marker file, and an existing
non-empty folder without it is refused (:mod:`adpo_train.safedir`): the cache never
replaces what the package did not write.  A dataset with no usable pair (all ties or all
corrupt) is an error.  ``hflip``/``random_crop`` (diffusers' default flip, ``--random_crop``)
are drawn once per pair (:func:`adpo_train.data.pair_augmentation`): a cache holds one view.  Training from the cache never runs the VAE or the text encoder.
"""
from __future__ import annotations

import json
import os
import time

import torch

from . import safedir
from .conditioning import encode_images, load_text_encoders, time_ids
from .data import CACHE_INDEX, PickAPicPairs, decode_image, pair_augmentation
from .errors import UserError


def build_cache(model_path: str, dataset_path: str, out_dir: str, *, split: str = "train", resolution: int = 512,
                batch_size: int = 8, shard_size: int = 1024, flip_ratio: float = 0.0, flip_seed: int = 0,
                max_pairs=None, seed: int = 0, dtype: str = "float32", device: str | None = None,
                variant=None, log=print, hflip: bool = False, random_crop: bool = False, vae_path=None) -> dict:
    from .models import encoder_fingerprint, load_vae

    safedir.check_replaceable(out_dir, "--latent_cache")  # refuse before any slow loading
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    store_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    vae = load_vae(model_path, variant, vae_path).to(device)
    encoders = load_text_encoders(model_path, variant).to(device)
    pairs = PickAPicPairs(dataset_path, split, flip_ratio, flip_seed, max_pairs)
    gen = torch.Generator(device=device).manual_seed(seed)
    tmp = safedir.begin(out_dir, "--latent_cache", "latent cache")
    shards, buf, num_corrupt, t0 = _Shards(tmp), [], 0, time.time()
    for i in range(len(pairs)):
        r = pairs.raw(i)
        aug = pair_augmentation(seed, i, hflip, random_crop)  # one view per pair, fixed at cache time
        (w, wm), (l, lm) = (decode_image(r[k], resolution, with_meta=True, **aug) for k in ("winner", "loser"))
        if w is None or l is None:
            num_corrupt += 1
            continue
        tids = torch.stack([time_ids(m[0], m[1], resolution) for m in (wm, lm)])
        ids = {k: v[0] for k, v in encoders.tokenize([r["caption"]]).items()}
        buf.append((torch.stack([w, l]), ids, r["row"], r["flipped"], tids))
        if len(buf) == batch_size or i == len(pairs) - 1:
            shards.add(buf, *_encode(buf, encoders, vae, gen, store_dtype))
            buf.clear()
            if shards.pending() >= shard_size:
                shards.write()
    if buf:
        shards.add(buf, *_encode(buf, encoders, vae, gen, store_dtype))
    shards.write()
    if not shards.files:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)  # ours (begin() made it): leave no half-built folder
        raise UserError(f"--dataset_name: no usable pair in {dataset_path!r} ({pairs.num_rows} rows: "
                        f"{pairs.num_ties} ties, {num_corrupt} pairs with an undecodable image)")
    meta = {"format": "adpo-train latent cache v1", "model": os.path.abspath(model_path),
            "model_fingerprint": encoder_fingerprint(model_path, vae_path),
            "dataset": os.path.abspath(dataset_path), "split": split, "resolution": resolution,
            "scaling_factor": float(vae.config.scaling_factor), "dtype": dtype, "seed": seed,
            "num_rows": pairs.num_rows, "num_ties": pairs.num_ties, "num_corrupt": num_corrupt,
            "num_pairs": sum(s["num_pairs"] for s in shards.files), "shards": shards.files, "sdxl": encoders.sdxl,
            "flip_ratio": flip_ratio, "flip_seed": flip_seed, "hflip": hflip, "random_crop": random_crop,
            "flipped_pairs": [k for k, f in enumerate(shards.flipped) if f],
            "flipped_rows": [r for r, f in zip(shards.rows, shards.flipped) if f]}
    with open(os.path.join(tmp, CACHE_INDEX), "w") as f:
        json.dump(meta, f)
    safedir.commit(tmp, out_dir)
    log(f"cache: {meta['num_pairs']} pairs in {len(shards.files)} shard(s) at {out_dir} "
        f"({pairs.num_ties} ties dropped, {num_corrupt} corrupt pairs skipped, "
        f"{len(meta['flipped_pairs'])} flipped) in {time.time() - t0:.1f}s")
    return meta


def _encode(buf: list, encoders, vae, gen: torch.Generator, store_dtype: torch.dtype):
    """``(latents, text, pooled or None)`` of a batch of buffered pairs, on the host in ``store_dtype``."""
    pix = torch.stack([b[0] for b in buf])
    ids = {k: torch.stack([b[1][k] for b in buf]) for k in buf[0][1]}
    text, pooled = encoders.encode(**ids)
    pooled = None if pooled is None else pooled.to(store_dtype).cpu()
    return encode_images(vae, pix, gen).to(store_dtype).cpu(), text.to(store_dtype).cpu(), pooled


class _Shards:
    """Encoded pairs gathered into ``shard-NNNNN.safetensors`` files; ``files`` lists those written,
    ``rows`` and ``flipped`` every kept pair in order."""

    def __init__(self, folder: str):
        self.folder, self.files, self.rows, self.flipped = folder, [], [], []
        self._lat, self._txt, self._meta, self._pooled, self._tids = [], [], [], [], []

    def add(self, buf: list, lat: torch.Tensor, txt: torch.Tensor, pooled) -> None:
        self._lat.append(lat)
        self._txt.append(txt)
        if pooled is not None:  # SDXL
            self._pooled.append(pooled)
            self._tids.append(torch.stack([b[4] for b in buf]))
        self._meta.extend((b[2], b[3]) for b in buf)
        self.rows.extend(b[2] for b in buf)
        self.flipped.extend(b[3] for b in buf)

    def pending(self) -> int:
        return sum(len(x) for x in self._lat)

    def write(self) -> None:
        from safetensors.torch import save_file

        if not self._lat:
            return
        name = f"shard-{len(self.files):05d}.safetensors"
        tensors = {"latents": torch.cat(self._lat).contiguous(), "text": torch.cat(self._txt).contiguous(),
                   "flipped": torch.tensor([m[1] for m in self._meta], dtype=torch.uint8),
                   "row": torch.tensor([m[0] for m in self._meta], dtype=torch.int64)}
        if self._pooled:
            tensors.update(pooled=torch.cat(self._pooled).contiguous(), time_ids=torch.cat(self._tids).contiguous())
        save_file(tensors, os.path.join(self.folder, name))
        self.files.append({"file": name, "num_pairs": len(self._meta)})
        for acc in (self._lat, self._txt, self._meta, self._pooled, self._tids):
            acc.clear()


def check_cache_fits(config, meta: dict, dataset, unet, log=print) -> None:
    """Training from a cache: it must come from the run's VAE and text encoder(s) (the fingerprint in
    ``index.json``; ``--allow_cache_model_mismatch`` lets a mismatch through with a warning) and its
    shapes must fit the UNet (always)."""
    _check_model(config, meta, log)
    _check_shapes(config.latent_cache, dataset, unet)


def _check_shapes(path: str, dataset, unet) -> None:
    """Latent channels and text width must be what the UNet takes (even with a mismatch allowed)."""
    if len(dataset) == 0:
        raise UserError(f"--latent_cache {path!r} holds no pairs")
    item = dataset[0]
    have = (item["latents"].shape[1], item["text"].shape[-1])
    cad = unet.config.cross_attention_dim
    want = (unet.config.in_channels, cad if isinstance(cad, int) else have[1])  # per-block widths: not checked
    if have != want:
        raise UserError(f"--latent_cache {path!r}: latents with {have[0]} channels and text width {have[1]}, but "
                        f"the UNet takes {want[0]} channels and text width {want[1]}: a cache of another model")


def _check_model(config, meta: dict, log) -> None:
    """A latent cache only fits the VAE and text encoder(s) it was built with."""
    from .models import encoder_fingerprint

    if not config.pretrained_model_name_or_path:
        return
    want = encoder_fingerprint(config.pretrained_model_name_or_path, config.pretrained_vae_model_name_or_path)
    have = meta.get("model_fingerprint")
    if have is None or have == want:
        return
    msg = (f"--latent_cache {config.latent_cache!r} was built with {meta.get('model')!r}, whose VAE/text encoder "
           f"differ from --pretrained_model_name_or_path {config.pretrained_model_name_or_path!r}")
    if not config.allow_cache_model_mismatch:
        raise UserError(msg + "; rebuild the cache, or pass --allow_cache_model_mismatch")
    log("warning: " + msg)
