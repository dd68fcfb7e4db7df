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

import glob
import io
import json
import os
from typing import Iterator, Optional

import numpy as np
import torch

from .conditioning import TextEncoders, time_ids, tokenize
from .errors import MissingInput, UserError

REQUIRED_COLUMNS = ("jpg_0", "jpg_1", "label_0", "caption")


# -- sources --------------------------------------------------------------------------
def _arrow_files(path: str, split: str) -> list[str]:
    if os.path.isfile(path):
        return [path]
    files = sorted(glob.glob(os.path.join(path, "**", "*.parquet"), recursive=True)
                   + glob.glob(os.path.join(path, "**", "*.arrow"), recursive=True))
    in_split = [f for f in files if split in os.path.relpath(f, path)]
    return in_split or files


def _read_arrow(path: str):
    import pyarrow as pa
    import pyarrow.parquet as pq

    if path.endswith(".parquet"):
        return pq.read_table(path, memory_map=True)
    with pa.memory_map(path) as src:
        try:
            return pa.ipc.open_stream(src).read_all()
        except pa.ArrowInvalid:
            return pa.ipc.open_file(src).read_all()


def open_table(path: str, split: str = "train"):
    """The dataset at ``path`` as one (memory-mapped where possible) ``pyarrow.Table``."""
    import pyarrow as pa

    if not os.path.exists(path):
        raise MissingInput(f"--dataset_name: {path!r} does not exist (local parquet/arrow files or a "
                                f"datasets.save_to_disk folder are expected; nothing is downloaded)")
    if os.path.isdir(path) and any(os.path.exists(os.path.join(path, f))
                                   for f in ("dataset_info.json", "state.json", "dataset_dict.json")):
        import datasets

        ds = datasets.load_from_disk(path)
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise UserError(f"--dataset_split_name: {split!r} not in {list(ds)}")
            ds = ds[split]
        if getattr(ds, "_indices", None) is not None:
            ds = ds.flatten_indices()
        table = ds.data.table if hasattr(ds.data, "table") else ds.data
    else:
        files = _arrow_files(path, split)
        if not files:
            raise MissingInput(f"--dataset_name: no .parquet or .arrow files under {path!r}")
        table = pa.concat_tables([_read_arrow(f) for f in files])
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise UserError(f"--dataset_name {path!r}: missing Pick-a-Pic columns {missing} (has {table.column_names})")
    return table


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
    """Kept (non-tie) pairs of a Pick-a-Pic-schema table, winner first, with seeded flips.

    Attributes: ``rows`` (table row of each kept pair), ``flipped`` (bool per kept pair),
    ``num_ties`` (rows dropped as ties), ``num_rows``.
    """

    def __init__(self, path: str, split: str = "train", flip_ratio: float = 0.0, flip_seed: int = 0,
                 max_pairs: Optional[int] = None):
        self.table = open_table(path, split)
        labels = self.table.column("label_0").to_numpy(zero_copy_only=False).astype(np.float64)
        self.num_rows = len(labels)
        keep = labels != 0.5
        self.num_ties = int((~keep).sum())
        self.rows = np.nonzero(keep)[0]
        if max_pairs is not None:
            self.rows = self.rows[:max_pairs]
        self.first_wins = labels[self.rows] > 0.5
        if not 0.0 <= flip_ratio <= 1.0:
            raise UserError(f"--inject_label_noise: expected a number in [0, 1], got {flip_ratio}")
        self.flipped = np.zeros(len(self.rows), dtype=bool)
        n_flip = int(round(flip_ratio * len(self.rows)))
        if n_flip:
            self.flipped[np.random.default_rng(flip_seed).choice(len(self.rows), n_flip, replace=False)] = True
        self.flip_ratio, self.flip_seed = flip_ratio, flip_seed

    def __len__(self) -> int:
        return len(self.rows)

    def raw(self, i: int) -> dict:
        """Pair ``i``: ``winner``/``loser`` encoded images (after any flip), ``caption``, ``row``, ``flipped``."""
        row = int(self.rows[i])
        rec = self.table.slice(row, 1).select(["jpg_0", "jpg_1", "caption"]).to_pylist()[0]
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


class CachedPairDataset(torch.utils.data.Dataset):
    """Pairs from a latent cache written by ``adpo-train cache`` (see :mod:`adpo_train.cache`).

    Shards are opened lazily with ``safetensors.safe_open`` (memory-mapped) in whichever
    process reads them, so the cache may be far larger than memory.
    """

    def __init__(self, cache_dir: str):
        path = os.path.join(cache_dir, CACHE_INDEX)
        if not os.path.isfile(path):
            raise MissingInput(f"--latent_cache: {cache_dir!r} has no {CACHE_INDEX} (build it with "
                                    f"`adpo-train cache`)")
        with open(path) as f:
            self.meta = json.load(f)
        self.dir = cache_dir
        self.counts = [s["num_pairs"] for s in self.meta["shards"]]
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)
        self._handles: dict[int, object] = {}
        self._key_sets: dict[int, set] = {}

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state

    def _shard(self, s: int):
        if s not in self._handles:
            from safetensors import safe_open

            self._handles[s] = safe_open(os.path.join(self.dir, self.meta["shards"][s]["file"]), framework="pt")
        return self._handles[s]

    def __getitem__(self, i: int) -> dict:
        s = int(np.searchsorted(self.offsets, i, side="right") - 1)
        j = i - int(self.offsets[s])
        f = self._shard(s)
        item = {"latents": f.get_slice("latents")[j:j + 1][0], "text": f.get_slice("text")[j:j + 1][0],
                "flipped": bool(f.get_slice("flipped")[j:j + 1][0]), "index": i}
        for key in ("pooled", "time_ids"):  # SDXL caches
            if key in self._keys(s):
                item[key] = f.get_slice(key)[j:j + 1][0]
        return item

    def _keys(self, s: int) -> set:
        if s not in self._key_sets:
            self._key_sets[s] = set(self._shard(s).keys())
        return self._key_sets[s]


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
    """

    def __init__(self, num_pairs: int, batch_size: int, seed: int, shuffle: bool = True, rank: int = 0,
                 world: int = 1):
        self.n, self.bs, self.seed, self.shuffle, self.rank, self.world = num_pairs, batch_size, seed, shuffle, rank, world
        if self.num_batches() == 0:
            raise UserError(f"{num_pairs} usable pairs are fewer than one batch of {batch_size * world} "
                            f"(--train_batch_size {batch_size} x {world} processes): nothing to train on")
        self.epoch, self.start = 0, 0

    def num_batches(self) -> int:
        return self.n // (self.bs * self.world)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return self.num_batches() - self.start

    def __iter__(self) -> Iterator[list[int]]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.n, generator=g).tolist()
        else:
            order = list(range(self.n))
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
