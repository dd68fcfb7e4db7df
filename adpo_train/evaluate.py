"""``adpo-train evaluate``: paired reward-model scoring of a tuned model against its base.

For every prompt ``i`` (of ``--prompts``) and image index ``k < K`` (``--num_images_per_prompt``)
the base pipeline and the tuned one (``--lora`` or ``--unet``) each draw one image from the same
generator seed ``seed + i * K + k``, so that base and tuned are compared pair by pair.  Every
``--reward`` scores every image.  Outputs in ``--output_dir`` (OUT):

* ``images/base/pIIIII_kKK.png`` and ``images/tuned/...``: written atomically (temp file + rename);
  a rerun reuses the ones there, so an interrupted evaluation continues where it stopped.
* ``scores.csv``: one row per image and reward: ``prompt, seed, model, reward, image, score``
  (``image`` relative to OUT).
* ``results.json``: ``rewards.<name>.base`` / ``.tuned`` (``mean``, ``ci95``), ``win_rate`` and
  ``win_rate_ci95``, and the ``settings``.  A win is ``tuned > base`` on the same prompt and seed; a
  tie counts half.  Means are over all images; the CIs are percentile bootstrap CIs over PROMPTS
  (prompts resampled with replacement, :data:`BOOTSTRAP_RESAMPLES` times, seed
  :data:`BOOTSTRAP_SEED`; a prompt's images stay together, base and tuned resampled together).
* ``grid.png``: base (left) next to tuned (right), one row per prompt, for the prompts whose mean
  score of the first reward differs most between the two.
* ``eval_settings.json``: the generation settings.  A rerun into the same OUT with other generation
  settings is refused (naming the flag): its images would not belong to one evaluation.  Rewards are
  not generation settings; they are recomputed on every run.

OUT must be absent, empty, or an evaluation folder this package wrote (its marker,
:mod:`adpo_train.safedir`); ``--overwrite_output_dir`` starts afresh in such a folder.  One process
at a time (:mod:`adpo_train.locks`).  Same settings, same machine: the same images and numbers.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import shutil
from typing import Optional, Sequence

import numpy as np

from . import locks, rewards, safedir
from .errors import MissingInput, UserError

BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0
GRID_PROMPTS = 8
SETTINGS_FILE = "eval_settings.json"
MARKER_KIND = "evaluation"
# generation setting -> the flag that sets it (named in a refusal)
SETTING_FLAGS = {"model": "--pretrained_model_name_or_path", "model_fingerprint": "--pretrained_model_name_or_path",
                 "tuned": "--lora/--unet", "tuned_fingerprint": "--lora/--unet", "prompts_sha256": "--prompts/--max_prompts",
                 "num_prompts": "--prompts/--max_prompts", "num_images_per_prompt": "--num_images_per_prompt",
                 "seed": "--seed", "resolution": "--resolution", "num_inference_steps": "--num_inference_steps",
                 "guidance_scale": "--guidance_scale", "batch_size": "--batch_size",
                 "mixed_precision": "--mixed_precision", "variant": "--variant",
                 "vae": "--pretrained_vae_model_name_or_path", "device": "--device", "sdxl": "--pretrained_model_name_or_path"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="adpo-train evaluate", description="Generate images of a prompt set with the "
                                "base model and the tuned one (same seeds), score them with reward models, and "
                                "report means, paired win rates and bootstrap CIs over prompts.")
    p.add_argument("--pretrained_model_name_or_path", required=True, help="the base model: a local diffusers "
                   "folder or a hub repo id in the local cache (SD or SDXL, detected from the folder)")
    p.add_argument("--variant")
    p.add_argument("--revision")
    p.add_argument("--cache_dir")
    p.add_argument("--pretrained_vae_model_name_or_path", help="an AutoencoderKL folder instead of vae/")
    t = p.add_mutually_exclusive_group(required=True)
    t.add_argument("--lora", help="a training run folder (or the .safetensors file) with "
                   "pytorch_lora_weights.safetensors")
    t.add_argument("--unet", help="a full fine-tune: the run folder with unet/, or the UNet folder")
    p.add_argument("--prompts", required=True, help=".txt (one prompt a line, blank lines skipped), or a "
                   "Pick-a-Pic-schema parquet file or folder of them (its distinct captions, in order)")
    p.add_argument("--max_prompts", type=int, help="only the first N prompts")
    p.add_argument("--reward", action="append", required=True, metavar="NAME=PATH",
                   help=f"a reward model (repeatable): {', '.join(rewards.NAMES)}; `toy` takes no path")
    p.add_argument("--reward_processor", action="append", default=[], metavar="NAME=DIR",
                   help="the CLIPProcessor folder of clip/pickscore, or the CLIP ViT-L/14 folder of aesthetic")
    p.add_argument("--num_images_per_prompt", type=int, default=4)
    p.add_argument("--seed", type=int, default=0, help="image (i, k) uses seed + i * K + k, base and tuned alike")
    p.add_argument("--resolution", type=int, help="default: the pipeline's (UNet sample size x VAE scale)")
    p.add_argument("--num_inference_steps", type=int, default=25)
    p.add_argument("--guidance_scale", type=float, default=7.5)
    p.add_argument("--batch_size", type=int, default=8, help="images per pipeline call")
    p.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default="no")
    p.add_argument("--device", help="default: cuda when available, else cpu")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--overwrite_output_dir", action="store_true", help="remove this package's earlier "
                   "evaluation in OUTPUT_DIR first")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


# -- prompts --------------------------------------------------------------------------------------
def read_prompts(path: str, max_prompts: Optional[int] = None) -> list[str]:
    """The prompts of a .txt file (one a line, stripped, blank lines skipped) or the distinct
    ``caption`` values of a parquet file / folder of parquet files, in first-appearance order.

    Only the caption column is read (``pyarrow.parquet.read_table(columns=...)``), so a Pick-a-Pic
    shard with inline images costs no more than its captions.  Self-contained on purpose: the
    training data reader (:mod:`adpo_train.data`) loads whole rows."""
    if not os.path.exists(path):
        raise MissingInput(f"--prompts: {path!r} does not exist")
    if os.path.isdir(path):
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".parquet"))
        if not files:
            raise MissingInput(f"--prompts: folder {path!r} holds no .parquet files")
    elif path.endswith(".parquet"):
        files = [path]
    else:
        with open(path, encoding="utf-8") as f:
            prompts = [line.strip() for line in f if line.strip()]
        files = []
    if files:
        import pyarrow.parquet as pq

        prompts = []
        for f in files:
            try:
                col = pq.read_table(f, columns=["caption"]).column("caption").to_pylist()
            except (KeyError, ValueError) as e:
                raise UserError(f"--prompts: {f!r} has no 'caption' column ({str(e).splitlines()[0]})") from None
            except OSError as e:
                raise UserError(f"--prompts: {f!r} is not a readable parquet file ({e})") from None
            prompts += [c.strip() for c in col if isinstance(c, str) and c.strip()]
        prompts = list(dict.fromkeys(prompts))
    if max_prompts is not None:
        if max_prompts < 1:
            raise UserError(f"--max_prompts: expected >= 1, got {max_prompts}")
        prompts = prompts[:max_prompts]
    if not prompts:
        raise UserError(f"--prompts: {path!r} holds no prompts")
    return prompts


# -- the tuned model ------------------------------------------------------------------------------
def _lora_file(path: str) -> str:
    from .models import LORA_WEIGHT_NAME

    f = os.path.join(path, LORA_WEIGHT_NAME) if os.path.isdir(path) else path
    if not os.path.isfile(f) or not f.endswith(".safetensors"):
        raise MissingInput(f"--lora: expected a run folder with {LORA_WEIGHT_NAME} or a .safetensors file, "
                           f"got {path!r}")
    return f


def _unet_dir(path: str) -> str:
    for d in (os.path.join(path, "unet"), path):
        if os.path.isfile(os.path.join(d, "config.json")):
            return d
    raise MissingInput(f"--unet: expected a UNet folder (config.json + weights) or a run folder with unet/, "
                       f"got {path!r}")


def _fingerprint(paths: Sequence[str]) -> str:
    """Size and first 1 MiB of every file (a safetensors header and first tensors): the weights' identity."""
    h = hashlib.sha256()
    for p in paths:
        files = [p] if os.path.isfile(p) else [os.path.join(r, f) for r, _, fs in sorted(os.walk(p)) for f in sorted(fs)]
        for f in files:
            if f.endswith((".safetensors", ".bin", ".json")):
                h.update(f"{os.path.relpath(f, p)}:{os.path.getsize(f)}".encode())
                with open(f, "rb") as fh:
                    h.update(fh.read(1 << 20))
    return h.hexdigest()[:16]


# -- the output folder ----------------------------------------------------------------------------
def check_output_dir(out: str, settings: dict, overwrite: bool) -> set:
    """Raise unless OUT is absent, empty, or this package's evaluation folder with the same generation
    settings (or ``overwrite``); writes nothing.  Returns OUT's entries (lock file aside)."""
    if os.path.lexists(out) and (not os.path.isdir(out) or os.path.islink(out)):
        raise UserError(f"--output_dir: {out!r} exists and is not a folder; choose another path")
    entries = set(os.listdir(out)) - {locks.LOCK_NAME} if os.path.isdir(out) else set()
    if entries and not safedir.owned(out):
        raise UserError(f"--output_dir: {out!r} is not empty and was not written by adpo-train; refusing to write "
                        f"into it (choose a new folder)")
    settings_path = os.path.join(out, SETTINGS_FILE)
    if entries and not os.path.isfile(settings_path) and entries != {safedir.MARKER}:
        raise UserError(f"--output_dir: {out!r} was written by adpo-train but is not an evaluation folder "
                        f"(no {SETTINGS_FILE}); choose another folder")
    if entries and not overwrite and os.path.isfile(settings_path):
        with open(settings_path) as f:
            old = json.load(f)
        for k in sorted(set(old) | set(settings)):
            if old.get(k) != settings.get(k):
                raise UserError(f"{SETTING_FLAGS.get(k, k)}: {out!r} holds an evaluation made with {k}="
                                f"{old.get(k)!r}, not {settings.get(k)!r}; use another --output_dir, the same "
                                f"settings, or --overwrite_output_dir")
    return entries


def prepare_output_dir(out: str, settings: dict, overwrite: bool) -> None:
    """Create OUT (with the marker and the settings), or empty this package's evaluation folder
    (``overwrite``), or keep it as it is (same settings: its images are reused)."""
    entries = check_output_dir(out, settings, overwrite)
    settings_path = os.path.join(out, SETTINGS_FILE)
    if entries and overwrite:
        for name in entries:
            full = os.path.join(out, name)
            shutil.rmtree(full) if os.path.isdir(full) and not os.path.islink(full) else os.remove(full)
        entries = set()
    os.makedirs(out, exist_ok=True)
    if os.path.isfile(settings_path):
        return
    with open(os.path.join(out, safedir.MARKER), "w") as f:
        f.write(f"{MARKER_KIND} written by adpo-train; the package may replace this folder\n")
    safedir.write_json(settings_path, settings, end="\n", indent=1)


def image_name(model: str, i: int, k: int) -> str:
    return os.path.join("images", model, f"p{i:05d}_k{k:02d}.png")


def _save_png(image, path: str) -> None:
    tmp = path + ".tmp.png"
    image.save(tmp, format="PNG")
    os.replace(tmp, path)  # a killed run leaves no half-written PNG under the final name


def _readable(path: str) -> bool:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.verify()
        return True
    except Exception:  # noqa: BLE001 - any unreadable file is regenerated
        return False


# -- generation -----------------------------------------------------------------------------------
def generate(pipe, prompts: list[str], model: str, out: str, s: dict, device, progress=None) -> int:
    """Draw every missing image of ``model`` (base or tuned); returns how many were written.

    The images are drawn in fixed chunks of ``batch_size`` of the (prompt, index) list; a chunk with
    any image missing is drawn whole and only its missing images are written.  A resumed run thus
    calls the pipeline on exactly the batches of an uninterrupted one: batched numerics differ with
    the batch's make-up, and the images must not."""
    import torch

    K, B = s["num_images_per_prompt"], s["batch_size"]
    keys = [(i, k) for i in range(len(prompts)) for k in range(K)]
    os.makedirs(os.path.join(out, "images", model), exist_ok=True)
    gen_device = device if device.type == "cuda" else "cpu"
    written = 0
    for start in range(0, len(keys), B):
        chunk = keys[start:start + B]
        missing = [j for j, (i, k) in enumerate(chunk) if not _readable(os.path.join(out, image_name(model, i, k)))]
        if missing:
            gens = [torch.Generator(device=gen_device).manual_seed(s["seed"] + i * K + k) for i, k in chunk]
            images = pipe([prompts[i] for i, _ in chunk], num_inference_steps=s["num_inference_steps"],
                          guidance_scale=s["guidance_scale"], height=s["resolution"], width=s["resolution"],
                          generator=gens).images
            for j in missing:
                _save_png(images[j], os.path.join(out, image_name(model, *chunk[j])))
            written += len(missing)
        if progress is not None:
            progress.update(len(chunk))
    return written


# -- statistics -----------------------------------------------------------------------------------
def bootstrap_ci(per_prompt: np.ndarray, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
                 idx: Optional[np.ndarray] = None) -> list[float]:
    """95% percentile bootstrap CI of the mean of ``per_prompt`` (one value per prompt)."""
    if idx is None:
        idx = bootstrap_indices(len(per_prompt), resamples, seed)
    means = per_prompt[idx].mean(1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return [float(lo), float(hi)]


def bootstrap_indices(n: int, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def summarise(base: np.ndarray, tuned: np.ndarray) -> dict:
    """``{base, tuned: {mean, ci95}, win_rate, win_rate_ci95}`` of ``(prompts, K)`` score arrays; the
    same bootstrap resamples of prompts serve base, tuned and the win rate (paired)."""
    wins = (tuned > base) + 0.5 * (tuned == base)
    idx = bootstrap_indices(base.shape[0])
    out = {}
    for key, a in (("base", base), ("tuned", tuned)):
        out[key] = {"mean": float(a.mean()), "ci95": bootstrap_ci(a.mean(1), idx=idx)}
    out["win_rate"] = float(wins.mean())
    out["win_rate_ci95"] = bootstrap_ci(wins.mean(1), idx=idx)
    return out


def table(results: dict) -> str:
    lines = [f"{'reward':<12} {'base mean [95% CI]':>30} {'tuned mean [95% CI]':>30} {'win rate [95% CI]':>24}"]
    for name, r in results["rewards"].items():
        b, t = r["base"], r["tuned"]
        lines.append(f"{name:<12} {b['mean']:>10.4f} [{b['ci95'][0]:.4f}, {b['ci95'][1]:.4f}] "
                     f"{t['mean']:>10.4f} [{t['ci95'][0]:.4f}, {t['ci95'][1]:.4f}] "
                     f"{r['win_rate']:>8.3f} [{r['win_rate_ci95'][0]:.3f}, {r['win_rate_ci95'][1]:.3f}]")
    n, k = results["num_prompts"], results["num_images_per_prompt"]
    lines.append(f"({n} prompts x {k} images; win: tuned > base on the same prompt and seed, ties count half; "
                 f"CIs: bootstrap over prompts)")
    return "\n".join(lines)


# -- the command ----------------------------------------------------------------------------------
def _pairs(specs: Sequence[str], flag: str) -> dict:
    out = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not path:
            raise UserError(f"{flag} {spec!r}: expected NAME=DIR")
        out[name.strip().lower()] = path
    return out


def evaluate(a: argparse.Namespace, log=print) -> dict:
    """Run the evaluation of parsed flags ``a``; returns the results.json content."""
    import torch

    from .models import is_sdxl_folder, locate_model
    from .trainer import quiet_libraries

    quiet_libraries()  # the one progress bar is ours; no per-file loading bars

    for flag in ("num_images_per_prompt", "batch_size", "num_inference_steps"):
        if getattr(a, flag) < 1:
            raise UserError(f"--{flag}: expected >= 1, got {getattr(a, flag)}")
    if a.resolution is not None and (a.resolution < 8 or a.resolution % 8):
        raise UserError(f"--resolution: expected a positive multiple of 8, got {a.resolution}")
    specs = [rewards.parse_reward(r) for r in a.reward]
    names = [n for n, _ in specs]
    if len(set(names)) != len(names):
        raise UserError(f"--reward: each reward once (got {', '.join(names)})")
    procs = _pairs(a.reward_processor, "--reward_processor")
    for n in procs:
        if n not in names:
            raise UserError(f"--reward_processor {n}: no --reward {n}")
    model = locate_model(a.pretrained_model_name_or_path, a.revision, a.cache_dir)
    if not os.path.isfile(os.path.join(model, "model_index.json")):
        raise MissingInput(f"--pretrained_model_name_or_path: {model!r} is not a diffusers pipeline folder "
                           f"(no model_index.json)")
    tuned = _lora_file(a.lora) if a.lora else _unet_dir(a.unet)
    prompts = read_prompts(a.prompts, a.max_prompts)
    device = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[a.mixed_precision]
    resolution = a.resolution or _default_resolution(model)
    s = dict(model=os.path.abspath(model), model_fingerprint=_fingerprint([os.path.join(model, "unet")]),
             tuned=("lora:" if a.lora else "unet:") + os.path.abspath(tuned), tuned_fingerprint=_fingerprint([tuned]),
             sdxl=is_sdxl_folder(model), prompts_sha256=hashlib.sha256("\n".join(prompts).encode()).hexdigest(),
             num_prompts=len(prompts), num_images_per_prompt=a.num_images_per_prompt, seed=a.seed,
             resolution=resolution, num_inference_steps=a.num_inference_steps, guidance_scale=a.guidance_scale,
             batch_size=a.batch_size, mixed_precision=a.mixed_precision, variant=a.variant,
             vae=a.pretrained_vae_model_name_or_path, device=device.type, scheduler="DPMSolverMultistepScheduler")
    out = a.output_dir
    check_output_dir(out, s, a.overwrite_output_dir)
    # load the scorers before anything slow is generated: a bad reward path fails in seconds
    scorers = {n: rewards.load_scorer(n, p, procs.get(n), device.type) for n, p in specs}
    prepare_output_dir(out, s, a.overwrite_output_dir)
    with locks.hold(locks.lock_path(out, inside=True), f"evaluation folder {out}", "--output_dir"):
        drawn = _generate_both(a, model, tuned, prompts, out, s, device, dtype, log)
        log(f"evaluate: {drawn} images drawn, {2 * len(prompts) * a.num_images_per_prompt - drawn} reused")
        results = _score(scorers, prompts, out, s)
    log(table(results))
    log(f"evaluate: wrote {out}/{{scores.csv,results.json,grid.png,images/}}")
    return results


def _default_resolution(model: str) -> int:
    with open(os.path.join(model, "unet", "config.json")) as f:
        sample = json.load(f)["sample_size"]
    with open(os.path.join(model, "vae", "config.json")) as f:
        scale = 2 ** (len(json.load(f)["block_out_channels"]) - 1)
    return int(sample * scale)


def _generate_both(a, model, tuned, prompts, out, s, device, dtype, log) -> int:
    from tqdm.auto import tqdm

    from .validation import load_pipeline

    total = len(prompts) * s["num_images_per_prompt"]
    drawn = 0
    pipe = None
    for which in ("base", "tuned"):
        missing = any(not _readable(os.path.join(out, image_name(which, i, k)))
                      for i in range(len(prompts)) for k in range(s["num_images_per_prompt"]))
        if not missing:
            continue
        if pipe is None or which == "tuned" and a.unet:
            unet = None
            if which == "tuned" and a.unet:
                from diffusers import UNet2DConditionModel

                from .models import dtype_kwargs

                unet = UNet2DConditionModel.from_pretrained(tuned, local_files_only=True, **dtype_kwargs(dtype))
            pipe = load_pipeline(model, device, dtype, a.variant, a.pretrained_vae_model_name_or_path, unet=unet)
        if which == "tuned" and a.lora:
            pipe.load_lora_weights(os.path.dirname(tuned) or ".", weight_name=os.path.basename(tuned))
        with tqdm(total=total, desc=f"evaluate: {which} images", disable=a.quiet) as bar:
            drawn += generate(pipe, prompts, which, out, s, device, bar)
    return drawn


def _score(scorers: dict, prompts: list[str], out: str, s: dict) -> dict:
    from PIL import Image

    K = s["num_images_per_prompt"]
    keys = [(i, k) for i in range(len(prompts)) for k in range(K)]
    images = {}
    for which in ("base", "tuned"):
        ims = []
        for i, k in keys:
            with Image.open(os.path.join(out, image_name(which, i, k))) as im:
                ims.append(im.convert("RGB"))
        images[which] = ims
    texts = [prompts[i] for i, _ in keys]
    scores = {n: {w: np.asarray(f(images[w], texts), dtype=np.float64).reshape(len(prompts), K)
                  for w in ("base", "tuned")} for n, f in scorers.items()}
    rows = [dict(prompt=prompts[i], seed=s["seed"] + i * K + k, model=w, reward=n, image=image_name(w, i, k),
                 score=repr(float(scores[n][w][i, k])))
            for n in scorers for w in ("base", "tuned") for i, k in keys]
    tmp = os.path.join(out, "scores.csv.tmp")
    with open(tmp, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=["prompt", "seed", "model", "reward", "image", "score"])
        wr.writeheader()
        wr.writerows(rows)
    os.replace(tmp, os.path.join(out, "scores.csv"))
    results = {"rewards": {n: summarise(v["base"], v["tuned"]) for n, v in scores.items()},
               "num_prompts": len(prompts), "num_images_per_prompt": K,
               "win_rate_definition": "tuned > base on the same prompt and seed; ties count half",
               "ci": {"method": "percentile bootstrap over prompts", "resamples": BOOTSTRAP_RESAMPLES,
                      "seed": BOOTSTRAP_SEED, "level": 0.95},
               "settings": s}
    safedir.write_json(os.path.join(out, "results.json"), results, end="\n", indent=1)
    first = scores[next(iter(scorers))]
    diff = np.abs(first["tuned"] - first["base"])
    order = np.argsort(-diff.mean(1), kind="stable")[:GRID_PROMPTS]
    from .validation import grid

    rows_img = []
    for i in order:
        k = int(np.argmax(diff[i]))
        rows_img.append([images["base"][i * K + k], images["tuned"][i * K + k]])
    tmp = os.path.join(out, "grid.tmp.png")
    grid(rows_img).save(tmp, format="PNG")
    os.replace(tmp, os.path.join(out, "grid.png"))
    return results


def main(argv: Optional[Sequence[str]] = None) -> int:
    evaluate(build_parser().parse_args(list(argv or [])))
    return 0
