"""Reward models of ``adpo-train evaluate``, loaded from local folders (nothing is downloaded).

Each scorer maps ``(images, prompts)`` (PIL images, one prompt per image) to one float per image;
higher is better.  ``--reward NAME=PATH`` picks one (``--reward toy`` needs no path):

* ``clip``, ``pickscore``: a transformers ``CLIPModel`` folder scored as
  ``logit_scale.exp() * cos(image_embeds, text_embeds)`` (PickScore's definition; CLIP score
  up to its scale).  The ``CLIPProcessor`` files are read from PATH, or from the folder that
  ``--reward_processor NAME=DIR`` names (PickScore_v1 ships without them: they are
  laion/CLIP-ViT-H-14-laion2B-s32B-b79K's).
* ``hpsv2``: through ``open_clip`` (if installed): a ViT-H-14 model with the HPSv2 checkpoint
  at PATH (``HPS_v2_compressed.pt``); score ``cos(image, text)``, as HPSv2 reports it.
* ``aesthetic``: the LAION aesthetic predictor, a stack of ``Linear`` layers (no activations)
  on the L2-normalised CLIP ViT-L/14 image embedding.  PATH is a folder holding one ``.pth``
  or ``.safetensors`` MLP state dict (``layers.N.weight``/``bias``, e.g.
  ``sac+logos+ava1-l14-linearMSE.pth``) and a ``clip/`` subfolder (transformers
  ``CLIPModel`` + processor of openai/clip-vit-large-patch14), or the MLP file itself with
  ``--reward_processor aesthetic=CLIP_L_DIR``.
* ``imagereward``: through the ``image-reward`` package (if installed): PATH is a folder holding
  ``ImageReward.pt`` and ``med_config.json`` (THUDM/ImageReward), loaded with the hub client offline.
* ``toy``: :func:`toy_reward`, what the built-in toy's preference set prefers.

A scorer whose package is missing raises a one-line :class:`UserError` naming what to install.
"""
from __future__ import annotations

import os
from typing import Callable, Optional, Sequence

import numpy as np

from .errors import MissingInput, UserError

NAMES = ("clip", "pickscore", "hpsv2", "aesthetic", "imagereward", "toy")
# Pip names of the optional packages of each scorer.
PACKAGES = {"hpsv2": ("open_clip", "open-clip-torch"), "imagereward": ("ImageReward", "image-reward")}
# The toy reward: softness of the pixel-to-palette assignment (in 0..255 RGB units).
TOY_SIGMA = 30.0
TOY_BACKGROUND = (128, 128, 128)


def parse_reward(spec: str) -> tuple[str, Optional[str]]:
    """``"NAME=PATH"`` (or ``"toy"``) -> ``(name, path)``; a bad spec names ``--reward``."""
    name, sep, path = spec.partition("=")
    name = name.strip().lower()
    if name not in NAMES:
        raise UserError(f"--reward {spec!r}: unknown reward {name!r} (known: {', '.join(NAMES)})")
    if name == "toy":
        if path:
            raise UserError(f"--reward {spec!r}: the toy reward takes no path (use --reward toy)")
        return name, None
    if not sep or not path:
        raise UserError(f"--reward {spec!r}: expected {name}=PATH (a local folder or file)")
    return name, path


def _need(name: str):
    module, pip = PACKAGES[name]
    try:
        return __import__(module)
    except ImportError:
        raise UserError(f"--reward {name}: needs the {pip!r} package (pip install {pip})") from None


def _locate(path: str, name: str, what: str = "--reward") -> str:
    from .models import locate_model

    if os.path.isfile(path):
        return path
    try:
        return locate_model(path, flag=f"{what} {name}")
    except UserError as e:
        raise MissingInput(str(e)) from None


def load_scorer(name: str, path: Optional[str], processor: Optional[str] = None, device: str = "cpu",
                batch_size: int = 16) -> Callable[[Sequence, Sequence[str]], np.ndarray]:
    """The scorer ``(images, prompts) -> float64 array``; raises :class:`UserError` on a bad path."""
    if name == "toy":
        return lambda images, prompts: np.asarray([toy_reward(im, p) for im, p in zip(images, prompts)])
    path = _locate(path, name)
    if name in ("clip", "pickscore"):
        return _clip_scorer(name, path, processor, device, batch_size)
    if name == "aesthetic":
        return _aesthetic_scorer(path, processor, device, batch_size)
    if name == "hpsv2":
        return _hpsv2_scorer(path, device, batch_size)
    return _imagereward_scorer(path, device)


def _load_clip(name: str, path: str, processor: Optional[str], device: str):
    from transformers import CLIPModel, CLIPProcessor

    if processor:
        processor = _locate(processor, name, "--reward_processor")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise MissingInput(f"--reward {name}: {path!r} is not a transformers CLIPModel folder (config.json "
                           f"+ weights)")
    proc_dir = processor or path
    if not any(os.path.isfile(os.path.join(proc_dir, f)) for f in ("preprocessor_config.json", "processor_config.json")):
        raise MissingInput(f"--reward {name}: no CLIPProcessor files (preprocessor_config.json, tokenizer) in "
                           f"{proc_dir!r}; name their folder with --reward_processor {name}=DIR")
    model = CLIPModel.from_pretrained(path, local_files_only=True).to(device).eval()
    proc = CLIPProcessor.from_pretrained(proc_dir, local_files_only=True)
    return model, proc


def _batches(n: int, size: int):
    for s in range(0, n, size):
        yield slice(s, min(s + size, n))


def _clip_scorer(name, path, processor, device, batch_size):
    import torch

    model, proc = _load_clip(name, path, processor, device)
    max_len = min(getattr(proc.tokenizer, "model_max_length", 77), model.config.text_config.max_position_embeddings)

    def score(images, prompts):
        out = []
        for sl in _batches(len(images), batch_size):
            inputs = proc(text=list(prompts[sl]), images=list(images[sl]), return_tensors="pt", padding=True,
                          truncation=True, max_length=max_len).to(device)
            with torch.no_grad():
                o = model(**inputs)
            # logits_per_image[i, j] = logit_scale.exp() * cos(image i, text j): the diagonal pairs each
            # image with its own prompt
            out.append(torch.diagonal(o.logits_per_image).double().cpu().numpy())
        return np.concatenate(out)

    return score


def _image_embeds(model, pixel_values):
    out = model.get_image_features(pixel_values=pixel_values)
    return out.pooler_output if hasattr(out, "pooler_output") else out  # transformers 5 returns an output


def load_aesthetic_mlp(path: str):
    """The LAION aesthetic MLP: its ``Linear`` layers in order, from a ``layers.N.weight/bias`` state dict."""
    import torch

    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    state = state.get("state_dict", state)
    idx = sorted({int(k.split(".")[1]) for k in state if k.startswith("layers.") and k.endswith(".weight")})
    if not idx:
        raise UserError(f"--reward aesthetic: {path!r} holds no layers.N.weight tensors (the LAION MLP)")
    linears = []
    for i in idx:
        w, b = state[f"layers.{i}.weight"], state[f"layers.{i}.bias"]
        lin = torch.nn.Linear(w.shape[1], w.shape[0])
        lin.load_state_dict({"weight": w.float(), "bias": b.float()})
        linears.append(lin)
    return torch.nn.Sequential(*linears).eval()


def _aesthetic_scorer(path, processor, device, batch_size):
    import torch

    if os.path.isdir(path):
        files = [f for f in sorted(os.listdir(path)) if f.endswith((".pth", ".pt", ".safetensors"))]
        if len(files) != 1:
            raise MissingInput(f"--reward aesthetic: expected one .pth/.safetensors MLP file in {path!r}, "
                               f"found {len(files)}")
        mlp_file, clip_dir = os.path.join(path, files[0]), processor or os.path.join(path, "clip")
    else:
        mlp_file, clip_dir = path, processor
    if not clip_dir:
        raise UserError("--reward aesthetic=FILE: name the CLIP ViT-L/14 folder with "
                        "--reward_processor aesthetic=DIR (or give a folder with the MLP file and clip/)")
    model, proc = _load_clip("aesthetic", clip_dir if os.path.isdir(clip_dir) else _locate(clip_dir, "aesthetic"),
                             None, device)
    mlp = load_aesthetic_mlp(mlp_file).to(device)

    def score(images, prompts):
        out = []
        for sl in _batches(len(images), batch_size):
            pix = proc(images=list(images[sl]), return_tensors="pt")["pixel_values"].to(device)
            with torch.no_grad():
                e = _image_embeds(model, pix).float()
                e = e / e.norm(dim=-1, keepdim=True)
                out.append(mlp(e)[:, 0].double().cpu().numpy())
        return np.concatenate(out)

    return score


def _hpsv2_scorer(path, device, batch_size, arch: str = "ViT-H-14"):
    import torch

    open_clip = _need("hpsv2")
    model, _, preprocess = open_clip.create_model_and_transforms(arch, pretrained=None, device=device)
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state.get("state_dict", state))
    model.eval()
    tokenizer = open_clip.get_tokenizer(arch)

    def score(images, prompts):
        out = []
        for sl in _batches(len(images), batch_size):
            pix = torch.stack([preprocess(im) for im in images[sl]]).to(device)
            with torch.no_grad():
                i = model.encode_image(pix)
                t = model.encode_text(tokenizer(list(prompts[sl])).to(device))
                i, t = i / i.norm(dim=-1, keepdim=True), t / t.norm(dim=-1, keepdim=True)
            out.append((i * t).sum(-1).double().cpu().numpy())
        return np.concatenate(out)

    return score


IMAGEREWARD_FILES = ("ImageReward.pt", "med_config.json")


def _imagereward_scorer(path, device):
    """``ImageReward.load(ImageReward.pt, download_root=its folder)``: the package's ``load`` fetches
    ``med_config.json`` into ``download_root`` through the hub client, so the file must lie next to
    the checkpoint, and the hub client is held offline while it loads (BLIP's BERT tokenizer then
    comes from the local hub cache, or the load fails: nothing is downloaded)."""
    rm = _need("imagereward")
    ckpt = path if os.path.isfile(path) else os.path.join(path, IMAGEREWARD_FILES[0])
    root = os.path.dirname(os.path.abspath(ckpt))
    missing = [f for f in IMAGEREWARD_FILES if not os.path.isfile(os.path.join(root, f))]
    if missing:
        raise MissingInput(f"--reward imagereward: {root!r} lacks {' and '.join(missing)} (the files of "
                           f"THUDM/ImageReward: ImageReward.pt and med_config.json, in one folder)")
    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    try:
        model = rm.load(os.path.join(root, IMAGEREWARD_FILES[0]), device=device, download_root=root)
    except Exception as e:  # the package's own errors are many: one line naming what was loaded
        raise UserError(f"--reward imagereward: loading {root!r} failed offline ({type(e).__name__}: {e})") from None
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v

    def score(images, prompts):
        # score(prompt, PIL image): one float (a list goes through inference_rank, which squeezes)
        return np.asarray([float(model.score(p, im)) for im, p in zip(images, prompts)], dtype=np.float64)

    return score


def toy_reward(image, prompt: str) -> float:
    """What the toy's preference set prefers (:mod:`adpo_train.toy`): its winner draws the caption's
    shape in the caption's colour, its loser in another palette colour, on a grey background.

    Each pixel is softly assigned to the nearest of the six palette colours and the background grey
    (``softmax(-|x - c|^2 / (2 sigma^2))``, sigma = :data:`TOY_SIGMA`); the reward is the mean mass on the
    named colour minus the mean mass on the other palette colours, in [-1, 1].  A caption with no
    palette colour scores 0.
    """
    from .toy import COLORS

    named = next((c for c in prompt.lower().split() if c in COLORS), None)
    if named is None:
        return 0.0
    x = np.asarray(image.convert("RGB"), dtype=np.float64).reshape(-1, 1, 3)
    names = list(COLORS)
    centres = np.asarray([COLORS[c] for c in names] + [TOY_BACKGROUND], dtype=np.float64)[None]
    logits = -((x - centres) ** 2).sum(-1) / (2 * TOY_SIGMA ** 2)
    logits -= logits.max(1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(1, keepdims=True)
    mass = p.mean(0)
    k = names.index(named)
    return float(mass[k] - (mass[:len(names)].sum() - mass[k]))
