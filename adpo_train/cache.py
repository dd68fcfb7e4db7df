"""``adpo-train cache``: precompute VAE latents of both images and the text embeddings (format v2).

Output folder (``index.json`` describes it):

* ``shard-NNNNN.safetensors``: the pairs ``[N * shard_size, (N + 1) * shard_size)`` of the kept
  (non-tie) pairs, minus those with an undecodable image: ``latents`` ``(n, 2, C, h, w)``
  (winner, loser; already multiplied by the VAE scaling factor), ``text_id`` ``(n,)``,
  ``flipped`` ``(n,)``, ``row`` ``(n,)`` (row in the source), ``pair`` ``(n,)`` (kept-pair index);
  SDXL adds ``time_ids`` ``(n, 2, 6)`` (per image: original size, crop top-left, target size).
* ``text-NNNNN.safetensors``: the text embeddings, once per distinct caption (``text_id`` indexes
  them in order of first appearance): ``text`` ``(m, L, D)`` (last hidden state of the text
  encoder; SDXL: both encoders' penultimate states, concatenated), SDXL ``pooled`` ``(m, P)``.
  ``dedup_text=False`` (``--no_text_dedup``) stores one entry per pair instead.

A v2 pair costs ``latents + time_ids + 26 bytes``, plus ``text (+ pooled)`` per distinct caption
(docs/trainer.md gives the numbers for SD1.5 and SDXL).

**Scale.**  Images are decoded in DataLoader workers (``num_workers``), overlapped with the VAE.
Under ``torchrun`` (``WORLD_SIZE`` > 1) each process encodes the shards ``u`` with
``u % world == rank`` of the list of text then pair shards, and rank 0 writes ``index.json`` after
all are done.  Every random draw is a function of the shard (the VAE's sample noise is seeded by
``(seed, shard)``, the flip/crop by ``(seed, pair)``) and every shard is encoded in the same
batches, so the cache is byte-identical whatever the number of processes or workers, and however
often the build was interrupted.

**Faults.**  The folder is built under ``<out>.tmp`` and renamed when complete; it carries a marker
file and a non-empty folder without it is refused (:mod:`adpo_train.safedir`).  One build at a time:
rank 0 holds the lock ``<out>.lock`` (:mod:`adpo_train.locks`) for the whole build, so a second
build is refused naming the first one's pid and never touches its ``.tmp``.  A shard counts once it
is written, fsync'ed and renamed into place; rerunning the same command after a crash or ``kill -9``
keeps the completed shards and encodes the rest.  The arguments that decide the bytes are recorded
in ``<out>.tmp/build.json``; a rerun with different ones is refused naming the first differing flag
(``restart=True``, ``--restart_cache``, starts over).  A dataset with no usable pair is an error.
``hflip``/``random_crop`` are drawn once per pair (:func:`adpo_train.data.pair_augmentation`): a
cache holds one view.  Training from the cache never runs the VAE or the text encoder.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import shutil
import time

import numpy as np
import torch

from . import locks, safedir
from .conditioning import encode_images, load_text_encoders, time_ids
from .data import CACHE_FORMAT, CACHE_INDEX, PickAPicPairs, decode_image, pair_augmentation
from .errors import UserError

BUILD_RECORD = "build.json"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# build.json key -> the flag that sets it (named when a rerun's arguments differ from the partial build's)
FLAGS = {"model": "--pretrained_model_name_or_path", "vae": "--pretrained_vae_model_name_or_path",
         "model_fingerprint": "--pretrained_model_name_or_path (its VAE/text encoder files changed)",
         "dataset": "--dataset_name",
         "dataset_files": "--dataset_name (its files changed)", "split": "--dataset_split_name",
         "resolution": "--resolution", "batch_size": "--batch_size", "shard_size": "--shard_size",
         "flip_ratio": "--inject_label_noise", "flip_seed": "--flip_seed", "max_pairs": "--max_train_samples",
         "seed": "--seed", "dtype": "--cache_dtype", "hflip": "--no_hflip", "random_crop": "--random_crop",
         "dedup_text": "--no_text_dedup", "format": "the cache format (a build of another adpo-train version)"}


def cache_dtype(mixed_precision) -> str:
    """The default ``--cache_dtype``: the training precision (bf16/fp16), float32 otherwise."""
    return {"bf16": "bfloat16", "fp16": "float16"}.get(mixed_precision or "no", "float32")


class _Group:
    """The processes of one build: ``torch.distributed`` (gloo: only small objects move) when
    ``WORLD_SIZE`` > 1, else a group of one."""

    def __init__(self, distributed: bool = True):
        import torch.distributed as dist

        self.dist, self.rank, self.world, self.local_rank, self.owned = None, 0, 1, 0, False
        if not distributed:
            return
        if dist.is_available() and dist.is_initialized():
            self.dist = dist
        elif int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # a rank that finishes its share early waits at the end for the others: hours, not the 30 min default
            dist.init_process_group("gloo", timeout=datetime.timedelta(hours=48))
            self.dist, self.owned = dist, True
        if self.dist is not None:
            self.rank, self.world = dist.get_rank(), dist.get_world_size()
            self.local_rank = int(os.environ.get("LOCAL_RANK", self.rank))

    def share(self, obj):
        """Rank 0's ``obj`` on every rank (a collective: every rank must call it)."""
        if self.world == 1:
            return obj
        box = [obj]
        self.dist.broadcast_object_list(box, src=0)
        return box[0]

    def raise_if(self, error) -> None:
        """Raise rank 0's error (a message or None) on every rank: a one-line refusal everywhere."""
        error = self.share(error)
        if error:
            raise UserError(error)

    def barrier(self) -> None:
        """Wait until every rank is here (rank 0 reads the others' shards only after)."""
        if self.world > 1:
            self.dist.barrier()

    def close(self) -> None:
        if self.owned:
            self.dist.destroy_process_group()


def _write_shard(tensors: dict, folder: str, name: str, metadata: dict) -> None:
    """Write, fsync and rename into place: a shard exists under its name only when complete."""
    from safetensors.torch import save_file

    part = os.path.join(folder, name + ".partial")
    save_file({k: v.contiguous() for k, v in tensors.items()}, part, metadata=metadata)
    fd = os.open(part, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(part, os.path.join(folder, name))
    safedir.fsync_dir(folder)


def _caption_ids(pairs: PickAPicPairs, dedup: bool):
    """``(text_id per pair, captions)``: distinct captions in order of first appearance (or one per pair)."""
    table, ids, texts = {}, np.empty(len(pairs), dtype=np.int64), []
    for i, cap in enumerate(pairs.captions()):
        if not dedup:
            ids[i] = len(texts)
            texts.append(cap)
            continue
        if cap not in table:
            table[cap] = len(texts)
            texts.append(cap)
        ids[i] = table[cap]
    return ids, texts


def _record(model_path, vae_path, dataset_path, pairs, **kw) -> dict:
    from .models import encoder_fingerprint

    files = [[os.path.abspath(f), os.path.getsize(f), os.stat(f).st_mtime_ns] for f in pairs.files]
    return {"format": CACHE_FORMAT, "model": os.path.abspath(model_path),
            "model_fingerprint": encoder_fingerprint(model_path, vae_path),
            "vae": os.path.abspath(vae_path) if vae_path else None, "dataset": os.path.abspath(dataset_path),
            "dataset_files": files, **kw}


def _check_record(tmp: str, want: dict):
    """None if the partial build in ``tmp`` was made with ``want``; else the refusal naming the flag."""
    with open(os.path.join(tmp, BUILD_RECORD)) as f:
        have = json.load(f)
    for k in FLAGS:
        if have.get(k) != want.get(k):
            old, new = have.get(k), want.get(k)
            if k == "dataset_files":
                old, new = f"{len(old or [])} files as recorded", f"{len(new or [])} files now (sizes/times differ)"
            return (f"--latent_cache: the partial build in {tmp!r} was made with {FLAGS[k]} {old!r}, this command "
                    f"gives {new!r}; rerun it with the same arguments to continue, or pass --restart_cache to "
                    f"start over")
    return None


class _DecodePairs(torch.utils.data.Dataset):
    """Decoded pixels of pair ``i`` (None if an image is undecodable) and its SDXL time ids: the work of
    the DataLoader workers."""

    def __init__(self, pairs: PickAPicPairs, resolution: int, seed: int, hflip: bool, random_crop: bool):
        self.pairs, self.resolution, self.seed, self.hflip, self.random_crop = pairs, resolution, seed, hflip, random_crop

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict:
        r = self.pairs.raw(i)
        aug = pair_augmentation(self.seed, i, self.hflip, self.random_crop)  # one view per pair
        (w, wm), (l, lm) = (decode_image(r[k], self.resolution, with_meta=True, **aug) for k in ("winner", "loser"))
        if w is None or l is None:
            return {"pair": i, "pixels": None}
        tids = torch.stack([time_ids(m[0], m[1], self.resolution) for m in (wm, lm)])
        return {"pair": i, "pixels": torch.stack([w, l]), "time_ids": tids, "row": r["row"], "flipped": r["flipped"]}


def _as_list(items):
    return items


def build_cache(model_path: str, dataset_path: str, out_dir: str, *, split: str = "train", resolution: int = 512,
                batch_size: int = 8, shard_size: int = 1024, flip_ratio: float = 0.0, flip_seed: int = 0,
                max_pairs=None, seed: int = 0, dtype: str | None = None, device: str | None = None,
                variant=None, log=print, hflip: bool = False, random_crop: bool = False, vae_path=None,
                num_workers: int = 0, restart: bool = False, dedup_text: bool = True, distributed: bool = True,
                progress: bool = False) -> dict:
    """Build (or continue) the latent cache of ``dataset_path`` at ``out_dir``; returns its ``index.json``.

    ``distributed``: split the work over the ``torch.distributed``/``torchrun`` processes (every one
    calls this); False builds in this process alone.  ``dtype`` None: float32 (the CLI's default
    follows ``--mixed_precision``, :func:`cache_dtype`).
    """
    dtype = dtype or "float32"
    if dtype not in DTYPES:
        raise UserError(f"--cache_dtype: expected one of {list(DTYPES)}, got {dtype!r}")
    for flag, v in (("--batch_size", batch_size), ("--shard_size", shard_size)):
        if v < 1:
            raise UserError(f"{flag}: expected a positive number, got {v}")
    if num_workers < 0:
        raise UserError(f"--dataloader_num_workers: expected 0 or more, got {num_workers}")
    safedir.check_replaceable(out_dir, "--latent_cache")  # refuse before any slow loading
    group = _Group(distributed)
    try:
        with contextlib.ExitStack() as stack:
            error = None
            if group.rank == 0:
                try:
                    stack.enter_context(locks.hold(locks.lock_path(out_dir, inside=False),
                                                   f"latent cache {out_dir}", "--latent_cache"))
                except UserError as e:
                    error = str(e)
            group.raise_if(error)
            return _build(group, model_path, dataset_path, out_dir, split=split, resolution=resolution,
                          batch_size=batch_size, shard_size=shard_size, flip_ratio=flip_ratio, flip_seed=flip_seed,
                          max_pairs=max_pairs, seed=seed, dtype=dtype, device=device, variant=variant, log=log,
                          hflip=hflip, random_crop=random_crop, vae_path=vae_path, num_workers=num_workers,
                          restart=restart, dedup_text=dedup_text, progress=progress)
    finally:
        group.close()


def _build(group: _Group, model_path, dataset_path, out_dir, *, split, resolution, batch_size, shard_size,
           flip_ratio, flip_seed, max_pairs, seed, dtype, device, variant, log, hflip, random_crop, vae_path,
           num_workers, restart, dedup_text, progress) -> dict:
    from .models import load_vae

    t0 = time.time()
    if device is None:
        device = f"cuda:{group.local_rank}" if torch.cuda.is_available() else "cpu"
    pairs = PickAPicPairs(dataset_path, split, flip_ratio, flip_seed, max_pairs)
    if len(pairs) == 0:
        raise UserError(f"--dataset_name: no usable pair in {dataset_path!r} ({pairs.num_rows} rows: "
                        f"{pairs.num_ties} ties, {pairs.num_bad_labels} with a label_0 other than 0, 0.5 or 1)")
    text_ids, texts = _caption_ids(pairs, dedup_text)
    record = _record(model_path, vae_path, dataset_path, pairs, split=split, resolution=resolution,
                     batch_size=batch_size, shard_size=shard_size, flip_ratio=flip_ratio, flip_seed=flip_seed,
                     max_pairs=max_pairs, seed=seed, dtype=dtype, hflip=hflip, random_crop=random_crop,
                     dedup_text=dedup_text)
    store_dtype = DTYPES[dtype]
    vae = load_vae(model_path, variant, vae_path).to(device)  # before the .tmp: a bad model folder leaves none
    encoders = load_text_encoders(model_path, variant).to(device)
    tmp = out_dir.rstrip("/") + ".tmp"
    error = None
    if group.rank == 0:
        try:
            tmp = safedir.begin(out_dir, "--latent_cache", "latent cache", keep=not restart)
            done = [n for n in os.listdir(tmp) if n.endswith(".safetensors")]
            if not done or not os.path.isfile(os.path.join(tmp, BUILD_RECORD)):
                if len(os.listdir(tmp)) > 1:  # nothing encoded yet, or of unknown arguments: start over
                    tmp = safedir.begin(out_dir, "--latent_cache", "latent cache", keep=False)
                safedir.write_json(os.path.join(tmp, BUILD_RECORD), record)
            error = _check_record(tmp, record)
        except UserError as e:
            error = str(e)
    group.raise_if(error)
    n_text, n_pair = -(-len(texts) // shard_size), -(-len(pairs) // shard_size)
    units = [("text", t) for t in range(n_text)] + [("pairs", k) for k in range(n_pair)]
    names = {u: f"{'text' if u[0] == 'text' else 'shard'}-{u[1]:05d}.safetensors" for u in units}
    mine = units[group.rank::group.world]
    todo = [u for u in mine if not os.path.isfile(os.path.join(tmp, names[u]))]
    if len(todo) < len(mine):
        log(f"cache: continuing the build in {tmp}: {len(mine) - len(todo)} of this process's {len(mine)} "
            f"shard(s) already complete")
    _encode_texts(tmp, [u[1] for u in todo if u[0] == "text"], texts, shard_size, batch_size, encoders,
                  store_dtype, progress and group.rank == 0)
    _encode_pairs(tmp, [u[1] for u in todo if u[0] == "pairs"], pairs, text_ids, shard_size, batch_size, vae,
                  encoders.sdxl, store_dtype, seed, resolution, hflip, random_crop, num_workers, device,
                  progress and group.rank == 0, group.world)
    group.barrier()  # every rank's shards are renamed into place before rank 0 lists them
    meta, error = None, None
    if group.rank == 0:
        try:
            meta = _finish(tmp, out_dir, record, pairs, texts, [names[u] for u in units if u[0] == "text"],
                           [names[u] for u in units if u[0] == "pairs"], vae, encoders.sdxl, dataset_path)
        except UserError as e:
            error = str(e)
    group.raise_if(error)  # also the barrier: every rank returns once the cache is in place
    if meta is None:
        with open(os.path.join(out_dir, CACHE_INDEX)) as f:
            meta = json.load(f)
    dt = time.time() - t0
    if group.rank == 0:
        log(f"cache: {meta['num_pairs']} pairs in {len(meta['shards'])} shard(s) + {len(meta['text_shards'])} text "
            f"shard(s) ({meta['num_texts']} texts) at {out_dir} ({meta['num_ties']} ties dropped, "
            f"{meta['num_corrupt']} corrupt pairs skipped, {meta['num_bad_labels']} bad labels skipped, "
            f"{len(meta['flipped_pairs'])} flipped) in {dt:.1f}s ({len(pairs) / max(dt, 1e-9):.1f} pairs/s over "
            f"{group.world} process(es)); {meta['bytes'] / 2**20:.1f} MiB, {meta['bytes_per_pair']:.0f} bytes/pair")
    return meta


def _bar(total: int, unit: str, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit=unit, desc=desc, disable=not enabled or total == 0, dynamic_ncols=True)


def _encode_texts(tmp, shards, texts, shard_size, batch_size, encoders, store_dtype, progress) -> None:
    bar = _bar(sum(len(texts[t * shard_size:(t + 1) * shard_size]) for t in shards), "caption", progress,
               "cache: text")
    for t in shards:
        caps = texts[t * shard_size:(t + 1) * shard_size]
        out, pooled = [], []
        for b in range(0, len(caps), batch_size):
            txt, pool = encoders.encode(**encoders.tokenize(caps[b:b + batch_size]))
            out.append(txt.to(store_dtype).cpu())
            if pool is not None:
                pooled.append(pool.to(store_dtype).cpu())
            bar.update(len(caps[b:b + batch_size]))
        tensors = {"text": torch.cat(out)}
        if pooled:
            tensors["pooled"] = torch.cat(pooled)
        _write_shard(tensors, tmp, f"text-{t:05d}.safetensors", {"num_texts": str(len(caps))})
    bar.close()


def _encode_pairs(tmp, shards, pairs, text_ids, shard_size, batch_size, vae, sdxl, store_dtype, seed,
                  resolution, hflip, random_crop, num_workers, device, progress, world) -> None:
    """Encode the pair shards ``shards``; each is decoded in the same batches (``batch_size`` pairs from
    its start) and its VAE noise drawn from a generator seeded by ``(seed, shard)``: the bytes do not
    depend on which process encodes it, nor on ``num_workers``."""
    if not shards:
        return
    batches, n = [], len(pairs)
    for k in shards:
        lo, hi = k * shard_size, min(n, (k + 1) * shard_size)
        batches.extend(list(range(b, min(hi, b + batch_size))) for b in range(lo, hi, batch_size))
    loader = torch.utils.data.DataLoader(_DecodePairs(pairs, resolution, seed, hflip, random_crop),
                                         batch_sampler=batches, collate_fn=_as_list, num_workers=num_workers)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    empty = (0, 2, vae.config.latent_channels, resolution // factor, resolution // factor)
    gen = torch.Generator(device=device)
    bar = _bar(len(sum(batches, [])), "pair", progress, f"cache: pairs (this process of {world})")
    current, acc = None, None

    def flush():
        good = [it for b in acc["items"] for it in b]
        lat = torch.cat(acc["lat"]) if acc["lat"] else torch.zeros(empty, dtype=store_dtype)
        idx = torch.tensor([it["pair"] for it in good], dtype=torch.int64)
        tensors = {"latents": lat, "text_id": torch.from_numpy(text_ids[idx.numpy()]).to(torch.int64),
                   "flipped": torch.tensor([it["flipped"] for it in good], dtype=torch.uint8),
                   "row": torch.tensor([it["row"] for it in good], dtype=torch.int64), "pair": idx}
        if sdxl:
            tensors["time_ids"] = (torch.stack([it["time_ids"] for it in good]) if good
                                   else torch.zeros((0, 2, 6), dtype=torch.float32))
        _write_shard(tensors, tmp, f"shard-{current:05d}.safetensors", {"num_corrupt": str(acc["corrupt"])})

    for items in loader:
        k = items[0]["pair"] // shard_size
        if k != current:
            if current is not None:
                flush()
            current, acc = k, {"items": [], "lat": [], "corrupt": 0}
            gen.manual_seed(seed * 1_000_003 + k)
        good = [it for it in items if it["pixels"] is not None]
        acc["corrupt"] += len(items) - len(good)
        if good:
            pix = torch.stack([it["pixels"] for it in good])
            acc["lat"].append(encode_images(vae, pix, gen).to(store_dtype).cpu())
            acc["items"].append(good)
        bar.update(len(items))
    flush()
    bar.close()


def _finish(tmp, out_dir, record, pairs, texts, text_files, pair_files, vae, sdxl, dataset_path) -> dict:
    """Rank 0, after every shard is in place: read their counts, write ``index.json``, rename into place."""
    from safetensors import safe_open

    shards, text_shards, flipped, rows, num_corrupt, total = [], [], [], [], 0, 0
    for name in text_files:
        with safe_open(os.path.join(tmp, name), framework="pt") as f:
            text_shards.append({"file": name, "num_texts": int(f.metadata()["num_texts"])})
    for name in pair_files:
        with safe_open(os.path.join(tmp, name), framework="pt") as f:
            num_corrupt += int(f.metadata()["num_corrupt"])
            fl, rw = f.get_tensor("flipped"), f.get_tensor("row")
        if len(fl):
            shards.append({"file": name, "num_pairs": len(fl)})
            flipped.extend(bool(x) for x in fl.tolist())
            rows.extend(rw.tolist())
    for name in os.listdir(tmp):
        if name.endswith(".partial"):  # a write killed mid-way, since redone under its own name
            os.remove(os.path.join(tmp, name))
    if not shards:
        shutil.rmtree(tmp, ignore_errors=True)  # ours (begin() made it); nothing in it can be resumed into a cache
        raise UserError(f"--dataset_name: no usable pair in {dataset_path!r} ({pairs.num_rows} rows: "
                        f"{pairs.num_ties} ties, {num_corrupt} pairs with an undecodable image)")
    total = sum(os.path.getsize(os.path.join(tmp, s["file"])) for s in shards + text_shards)
    num_pairs = sum(s["num_pairs"] for s in shards)
    meta = {**{k: v for k, v in record.items() if k not in ("dataset_files", "vae", "batch_size", "shard_size")},
            "scaling_factor": float(vae.config.scaling_factor), "num_rows": pairs.num_rows,
            "num_ties": pairs.num_ties, "num_bad_labels": pairs.num_bad_labels, "num_corrupt": num_corrupt,
            "num_pairs": num_pairs, "num_texts": len(texts), "shards": shards, "text_shards": text_shards,
            "sdxl": sdxl, "bytes": total, "bytes_per_pair": total / num_pairs,
            "flipped_pairs": [k for k, f in enumerate(flipped) if f],
            "flipped_rows": [r for r, f in zip(rows, flipped) if f]}
    safedir.write_json(os.path.join(tmp, CACHE_INDEX), meta)
    os.remove(os.path.join(tmp, BUILD_RECORD))  # the arguments live on in index.json
    safedir.commit(tmp, out_dir)
    return meta


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
