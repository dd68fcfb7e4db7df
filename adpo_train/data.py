"""Preference pairs in the Pick-a-Pic v2 schema, from images or from a latent cache.

Schema: ``jpg_0``, ``jpg_1`` (encoded image bytes), ``label_0`` (1: image 0 preferred,
0: image 1 preferred, 0.5: tie), ``caption``, optional ``user_id``.  Sources: local
``.parquet`` / ``.arrow`` files (or a folder of them) and ``datasets.save_to_disk``
folders.  Ties are dropped; pairs are ordered winner first; a corrupt image drops its
pair and is counted, never raises.  ``flip_ratio`` swaps winner and loser of a seeded
random subset of the kept pairs (the paper's synthetic-minority experiment) and the
flipped pairs are recorded.

The order of pairs is a pure function of ``(seed, epoch)`` (:class:`PairBatchSampler`),
so a checkpoint only needs ``(epoch, batches consumed)`` to resume exactly.
"""
from __future__ import annotations

import io
import json
import os
from typing import Iterator, Optional

import numpy as np
import torch

from .conditioning import TextEncoders, time_ids, tokenize
from .errors import MissingInput, UserError
from .source import REQUIRED_COLUMNS, BlockReader, dataset_files, scan_labels  # noqa: F401 (re-exported)


# -- sources: adpo_train.source reads the files in place, a block at a time -------------------------
def _image_bytes(value) -> Optional[bytes]:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, dict):  # datasets Image feature stored as {"bytes", "path"}
        if value.get("bytes") is not None:
            return value["bytes"]
        if value.get("path"):
            with open(value["path"], "rb") as f:
                return f.read()
    return None


def pair_augmentation(seed: int, index: int, hflip: bool, random_crop: bool) -> dict:
    """The crop and flip of pair ``index`` (diffusers' ``--random_crop`` and default horizontal flip, which
    its scripts apply to winner and loser together): a pure function of ``(seed, index)``, so a run, its
    resume and a latent cache agree.  ``crop``: fractions of the free room (None: centre crop)."""
    if not (hflip or random_crop):
        return {"flip": False, "crop": None}
    rng = np.random.default_rng([seed, index])
    crop = (float(rng.random()), float(rng.random()))
    return {"flip": bool(hflip and rng.random() < 0.5), "crop": crop if random_crop else None}


def decode_image(value, resolution: int, with_meta: bool = False, flip: bool = False, crop=None):
    """``(3, R, R)`` float in [-1, 1] (shorter side resized to R, centre crop), or None if undecodable.

    ``crop``: ``(fx, fy)`` in [0, 1): a crop at that fraction of the free room instead of the centre;
    ``flip``: mirror left-right after the crop.  ``with_meta``: ``(pixels, ((orig_h, orig_w),
    (crop_top, crop_left)))``, the SDXL micro-conditioning of the image (crop offsets in the resized
    image, as diffusers' SDXL training scripts record them).
    """
    from PIL import Image

    try:
        data = _image_bytes(value)
        img = Image.open(io.BytesIO(data)) if data is not None else value
        img = img.convert("RGB")
        w, h = img.size
        orig, top, left = (h, w), 0, 0
        s = resolution / min(w, h)
        if (w, h) != (resolution, resolution):
            img = img.resize((max(resolution, round(w * s)), max(resolution, round(h * s))), Image.BICUBIC)
            w, h = img.size
            left, top = (w - resolution) // 2, (h - resolution) // 2
            if crop is not None:
                left, top = int(crop[0] * (w - resolution + 1)), int(crop[1] * (h - resolution + 1))
            img = img.crop((left, top, left + resolution, top + resolution))
        if flip:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        arr = np.asarray(img, dtype=np.float32)
    except Exception:  # noqa: BLE001 - a corrupt image must never stop training
        return (None, None) if with_meta else None
    pixels = torch.from_numpy(arr).permute(2, 0, 1).div(127.5).sub(1.0)
    return (pixels, (orig, (top, left))) if with_meta else pixels


class PickAPicPairs:
    """Kept (non-tie) pairs of a Pick-a-Pic-schema dataset, winner first, with seeded flips, read in place.

    The index is built from ``label_0`` alone (:func:`adpo_train.source.scan_labels`); :meth:`raw`
    reads a pair's images and caption with the rest of its block through a bounded LRU
    (:class:`adpo_train.source.BlockReader`), so memory does not grow with the dataset.
    ``label_0`` 1 / 0: image 0 / 1 preferred; 0.5: a tie (dropped, ``num_ties``); anything else
    (NaN, 7.0, 0.3) is not a Pick-a-Pic label: skipped and counted (``num_bad_labels``), never
    read as a preference.

    Attributes: ``rows`` (global row of each kept pair, in file/block order), ``block`` (a block id
    per kept pair, for the block-aware shuffle), ``flipped`` (bool per kept pair), ``num_rows``.
    """

    def __init__(self, path: str, split: str = "train", flip_ratio: float = 0.0, flip_seed: int = 0,
                 max_pairs: Optional[int] = None):
        if not 0.0 <= flip_ratio <= 1.0:
            raise UserError(f"--inject_label_noise: expected a number in [0, 1], got {flip_ratio}")
        self.files = dataset_files(path, split)
        idx = scan_labels(self.files)
        labels = idx["label"]
        self.num_rows = len(labels)
        tie, good = labels == 0.5, (labels == 0.0) | (labels == 1.0)
        self.num_ties, self.num_bad_labels = int(tie.sum()), int((~tie & ~good).sum())
        self.rows = np.nonzero(good)[0]
        if max_pairs is not None:
            self.rows = self.rows[:max_pairs]
        self._file, self._block, self._row = (idx[k][self.rows] for k in ("file", "block", "row"))
        # one id per (file, block), increasing in file order
        self.block = np.unique(self._file.astype(np.int64) << 32 | self._block, return_inverse=True)[1]
        self.first_wins = labels[self.rows] > 0.5
        self.flipped = np.zeros(len(self.rows), dtype=bool)
        n_flip = int(round(flip_ratio * len(self.rows)))
        if n_flip:
            self.flipped[np.random.default_rng(flip_seed).choice(len(self.rows), n_flip, replace=False)] = True
        self.flip_ratio, self.flip_seed = flip_ratio, flip_seed
        self.reader = BlockReader(self.files)

    def __len__(self) -> int:
        return len(self.rows)

    def captions(self) -> Iterator[str]:
        """Every kept pair's caption in order, read a block at a time from the caption column alone."""
        reader, i, n = BlockReader(self.files, capacity=1), 0, len(self)
        while i < n:
            f, b = int(self._file[i]), int(self._block[i])
            j = i
            while j < n and self._file[j] == f and self._block[j] == b:
                j += 1
            col = reader.block(f, b, ("caption",)).column("caption").to_pylist()
            for r in self._row[i:j]:
                yield col[int(r)] or ""
            i = j

    def raw(self, i: int) -> dict:
        """Pair ``i``: ``winner``/``loser`` encoded images (after any flip; None if its block is unreadable),
        ``caption``, ``row``, ``flipped``."""
        row, f, b, r = int(self.rows[i]), int(self._file[i]), int(self._block[i]), int(self._row[i])
        try:
            rec = self.reader.block(f, b, ("jpg_0", "jpg_1", "caption")).slice(r, 1).to_pylist()[0]
        except UserError:
            raise
        except Exception:  # noqa: BLE001 - a block that cannot be decoded drops its pairs (counted as corrupt)
            rec = {"jpg_0": None, "jpg_1": None, "caption": ""}
        a, b = (rec["jpg_0"], rec["jpg_1"]) if self.first_wins[i] else (rec["jpg_1"], rec["jpg_0"])
        if self.flipped[i]:
            a, b = b, a
        return {"winner": a, "loser": b, "caption": rec["caption"] or "", "row": row,
                "flipped": bool(self.flipped[i])}

    def flip_record(self) -> dict:
        return {"flip_ratio": self.flip_ratio, "flip_seed": self.flip_seed, "num_pairs": len(self),
                "flipped_pairs": np.nonzero(self.flipped)[0].tolist(),
                "flipped_rows": self.rows[self.flipped].tolist()}


class ImagePairDataset(torch.utils.data.Dataset):
    """Decoded pixels of both images and the caption's token ids; ``None`` pixels if an image is corrupt.

    ``tokenizer``: a CLIP tokenizer, or a :class:`adpo_train.conditioning.TextEncoders` (SDXL: both
    tokenizers' ids and per-image ``time_ids`` ``(2, 6)``).
    """

    def __init__(self, pairs: PickAPicPairs, tokenizer, resolution: int, hflip: bool = False,
                 random_crop: bool = False, seed: int = 0):
        self.pairs, self.tokenizer, self.resolution = pairs, tokenizer, resolution
        self.hflip, self.random_crop, self.seed = hflip, random_crop, seed
        self.sdxl = isinstance(tokenizer, TextEncoders) and tokenizer.sdxl

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict:
        r = self.pairs.raw(i)
        aug = pair_augmentation(self.seed, i, self.hflip, self.random_crop)
        (w, wm), (l, lm) = (decode_image(r[k], self.resolution, with_meta=True, **aug) for k in ("winner", "loser"))
        pixels = None if w is None or l is None else torch.stack([w, l])
        if isinstance(self.tokenizer, TextEncoders):
            item = {k: v[0] for k, v in self.tokenizer.tokenize([r["caption"]]).items()}
        else:
            item = {"input_ids": tokenize(self.tokenizer, [r["caption"]])[0]}
        if self.sdxl and pixels is not None:
            item["time_ids"] = torch.stack([time_ids(m[0], m[1], self.resolution) for m in (wm, lm)])
        item.update(pixels=pixels, index=i, flipped=r["flipped"])
        return item


def collate_images(items: list[dict]) -> dict:
    good = [it for it in items if it["pixels"] is not None]
    out = {"num_corrupt": len(items) - len(good), "num_pairs": len(good)}
    if good:
        out.update(pixels=torch.stack([it["pixels"] for it in good]),
                   index=torch.tensor([it["index"] for it in good]),
                   flipped=torch.tensor([it["flipped"] for it in good]))
        for key in ("input_ids", "input_ids_2", "time_ids"):
            if key in good[0]:
                out[key] = torch.stack([it[key] for it in good])
    return out


# -- the latent cache --------------------------------------------------------------------
CACHE_INDEX = "index.json"
CACHE_FORMAT = "adpo-train latent cache v2"


class CachedPairDataset(torch.utils.data.Dataset):
    """Pairs from a latent cache written by ``adpo-train cache`` (see :mod:`adpo_train.cache`).

    Shards are opened lazily with ``safetensors.safe_open`` (memory-mapped) in whichever
    process reads them, so the cache may be far larger than memory.  A v2 cache keeps text
    embeddings once per distinct caption (``text-NNNNN`` shards, looked up by each pair's
    ``text_id``); a v1 cache (text stored per pair) still loads.
    """

    def __init__(self, cache_dir: str):
        path = os.path.join(cache_dir, CACHE_INDEX)
        if not os.path.isfile(path):
            raise MissingInput(f"--latent_cache: {cache_dir!r} has no {CACHE_INDEX} (build it with "
                                    f"`adpo-train cache`)")
        with open(path) as f:
            self.meta = json.load(f)
        fmt = self.meta.get("format", "")
        if fmt not in (CACHE_FORMAT, "adpo-train latent cache v1"):
            raise UserError(f"--latent_cache {cache_dir!r}: format {fmt!r} is not one this version reads "
                            f"({CACHE_FORMAT!r}); rebuild it with `adpo-train cache`")
        self.dir = cache_dir
        self.counts = [s["num_pairs"] for s in self.meta["shards"]]
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)
        texts = self.meta.get("text_shards", [])
        self.text_offsets = np.concatenate([[0], np.cumsum([t["num_texts"] for t in texts])]).astype(np.int64)
        self._handles: dict[str, object] = {}
        self._key_sets: dict[str, set] = {}

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state

    def _open(self, name: str):
        if name not in self._handles:
            from safetensors import safe_open

            self._handles[name] = safe_open(os.path.join(self.dir, name), framework="pt")
            self._key_sets[name] = set(self._handles[name].keys())
        return self._handles[name]

    def __getitem__(self, i: int) -> dict:
        s = int(np.searchsorted(self.offsets, i, side="right") - 1)
        j = i - int(self.offsets[s])
        name = self.meta["shards"][s]["file"]
        f = self._open(name)
        item = {"latents": f.get_slice("latents")[j:j + 1][0], "flipped": bool(f.get_slice("flipped")[j:j + 1][0]),
                "index": i}
        if "text_id" in self._key_sets[name]:  # v2: the caption's embedding, stored once
            t = int(f.get_slice("text_id")[j:j + 1][0])
            ts = int(np.searchsorted(self.text_offsets, t, side="right") - 1)
            tname, tj = self.meta["text_shards"][ts]["file"], t - int(self.text_offsets[ts])
            tf = self._open(tname)
            item["text"] = tf.get_slice("text")[tj:tj + 1][0]
            if "pooled" in self._key_sets[tname]:
                item["pooled"] = tf.get_slice("pooled")[tj:tj + 1][0]
        else:  # v1
            item["text"] = f.get_slice("text")[j:j + 1][0]
            if "pooled" in self._key_sets[name]:
                item["pooled"] = f.get_slice("pooled")[j:j + 1][0]
        if "time_ids" in self._key_sets[name]:  # SDXL caches
            item["time_ids"] = f.get_slice("time_ids")[j:j + 1][0]
        return item


def collate_cached(items: list[dict]) -> dict:
    return {"latents": torch.stack([it["latents"] for it in items]),
            "text": torch.stack([it["text"] for it in items]),
            "flipped": torch.tensor([it["flipped"] for it in items]),
            "index": torch.tensor([it["index"] for it in items]),
            "num_corrupt": 0, "num_pairs": len(items),
            **{k: torch.stack([it[k] for it in items]) for k in ("pooled", "time_ids") if k in items[0]}}


# -- order -------------------------------------------------------------------------------------
class PairBatchSampler(torch.utils.data.Sampler):
    """Batches of pair indices, a pure function of ``(seed, epoch)``; last partial batch dropped.

    With ``world > 1`` each global batch of ``batch_size * world`` pairs is split by rank.
    :meth:`set_epoch` with ``start`` skips batches already consumed (exact resume).

    ``blocks`` (a block id per pair, e.g. :attr:`PickAPicPairs.block`): a block-aware shuffle for
    data read a block at a time.  The blocks are permuted, then the pairs of each window of
    ``window`` consecutive (permuted) blocks are permuted among themselves; so a reader that keeps
    ``window`` blocks (:data:`adpo_train.source.BLOCK_CACHE`) reads each block once per epoch per
    process.  Without ``blocks``: a full permutation (a latent cache reads any pair cheaply).
    """

    def __init__(self, num_pairs: int, batch_size: int, seed: int, shuffle: bool = True, rank: int = 0,
                 world: int = 1, blocks=None, window: int = 4):
        self.n, self.bs, self.seed, self.shuffle, self.rank, self.world = num_pairs, batch_size, seed, shuffle, rank, world
        if self.num_batches() == 0:
            raise UserError(f"{num_pairs} usable pairs are fewer than one batch of {batch_size * world} "
                            f"(--train_batch_size {batch_size} x {world} processes): nothing to train on")
        self.blocks = None if blocks is None else np.asarray(blocks)
        self.window = window
        self.epoch, self.start = 0, 0

    def num_batches(self) -> int:
        return self.n // (self.bs * self.world)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return self.num_batches() - self.start

    def order(self) -> list[int]:
        """This epoch's order of all pairs."""
        if not self.shuffle:
            return list(range(self.n))
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        if self.blocks is None:
            return torch.randperm(self.n, generator=g).tolist()
        ids, counts = np.unique(self.blocks, return_counts=True)
        by_block = np.split(np.argsort(self.blocks, kind="stable"), np.cumsum(counts)[:-1])
        perm = torch.randperm(len(ids), generator=g).numpy()
        out = []
        for w in range(0, len(perm), self.window):
            pool = np.concatenate([by_block[k] for k in perm[w:w + self.window]])
            out.extend(pool[torch.randperm(len(pool), generator=g).numpy()].tolist())
        return out

    def __iter__(self) -> Iterator[list[int]]:
        order = self.order()
        gbs = self.bs * self.world
        for b in range(self.start, self.num_batches()):
            chunk = order[b * gbs:(b + 1) * gbs]
            yield chunk[self.rank * self.bs:(self.rank + 1) * self.bs]


class SyntheticPairDataset(torch.utils.data.Dataset):
    """Random latents and text embeddings of the right shapes (``--unet_config`` without data):
    for throughput runs of a random-init model.  Item ``i`` is a pure function of ``(seed, i)``."""

    def __init__(self, num_pairs: int, latent_shape, text_shape, pooled_dim=None, resolution: int = 512,
                 seed: int = 0):
        self.n, self.latent_shape, self.text_shape = num_pairs, tuple(latent_shape), tuple(text_shape)
        self.pooled_dim, self.resolution, self.seed = pooled_dim, resolution, seed
        self.meta = {"num_rows": num_pairs, "num_ties": 0, "num_corrupt": 0, "num_pairs": num_pairs,
                     "flip_ratio": 0.0, "flip_seed": 0, "flipped_pairs": [], "flipped_rows": []}

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        item = {"latents": torch.randn((2, *self.latent_shape), generator=g),
                "text": torch.randn(self.text_shape, generator=g), "flipped": False, "index": i}
        if self.pooled_dim:
            r = self.resolution
            item["pooled"] = torch.randn(self.pooled_dim, generator=g)
            item["time_ids"] = torch.tensor([[r, r, 0, 0, r, r]] * 2, dtype=torch.float32)
        return item
