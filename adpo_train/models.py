"""Loading a local diffusers-format model, adding and saving LoRA.

Only local folders are accepted (``local_files_only=True``, safetensors only, no
``trust_remote_code``): the trainer never downloads anything.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"


def check_local_model(path: str) -> str:
    from .errors import MissingInput

    if not os.path.isdir(path) or not os.path.isdir(os.path.join(path, "unet")):
        raise MissingInput(
            f"--pretrained_model_name_or_path: expected a local diffusers-format folder with unet/, vae/, "
            f"text_encoder/, tokenizer/ and scheduler/ subfolders, got {path!r}. This trainer never downloads; "
            f"fetch the model first (e.g. `huggingface-cli download <repo> --local-dir DIR`).")
    return path


def dtype_kwargs(dtype) -> dict:
    """``from_pretrained``'s dtype argument: ``dtype`` where diffusers has renamed it (and warns about
    ``torch_dtype``, 0.42 does), ``torch_dtype`` for the diffusers that predate the rename."""
    from diffusers.utils import deprecation_utils

    return {"dtype": dtype} if hasattr(deprecation_utils, "_resolve_dtype") else {"torch_dtype": dtype}


def load_unet(path: str, variant: Optional[str] = None):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(check_local_model(path), subfolder="unet", variant=variant,
                                                local_files_only=True, use_safetensors=True)


# Stable Diffusion's DDPM training noise schedule (SD1.5's and SDXL's scheduler configs)
SD_NOISE_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False)


def sd_scheduler(prediction_type: str = "epsilon", **extra):
    """A ``DDPMScheduler`` with :data:`SD_NOISE_SCHEDULE` (for a UNet without a model folder)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(**SD_NOISE_SCHEDULE, prediction_type=prediction_type, **extra)


def load_scheduler(path: str, prediction_type: Optional[str] = None):
    from diffusers import DDPMScheduler

    sched = DDPMScheduler.from_pretrained(check_local_model(path), subfolder="scheduler", local_files_only=True)
    if prediction_type is not None and prediction_type != sched.config.prediction_type:
        sched.register_to_config(prediction_type=prediction_type)
    return sched


def load_encoders(path: str, variant: Optional[str] = None):
    """``(vae, text_encoder, tokenizer)`` from the local folder, frozen, in eval mode."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTokenizer

    check_local_model(path)
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", variant=variant, local_files_only=True,
                                        use_safetensors=True)
    text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", variant=variant,
                                                 local_files_only=True, use_safetensors=True)
    tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", local_files_only=True)
    for m in (vae, text_encoder):
        m.requires_grad_(False).eval()
    return vae, text_encoder, tokenizer


def load_vae(path: str, variant: Optional[str] = None, vae_path: Optional[str] = None):
    """The model folder's ``vae/``, or ``vae_path`` (``--pretrained_vae_model_name_or_path``: an
    ``AutoencoderKL`` folder of its own, as diffusers' SDXL script loads it)."""
    from diffusers import AutoencoderKL

    if vae_path:
        from .errors import MissingInput

        if not os.path.isfile(os.path.join(vae_path, "config.json")):
            raise MissingInput(f"--pretrained_vae_model_name_or_path: {vae_path!r} is not a local AutoencoderKL "
                               f"folder (config.json + weights); nothing is downloaded")
        vae = AutoencoderKL.from_pretrained(vae_path, variant=variant, local_files_only=True)
        return vae.requires_grad_(False).eval()
    vae = AutoencoderKL.from_pretrained(check_local_model(path), subfolder="vae", variant=variant,
                                        local_files_only=True, use_safetensors=True)
    return vae.requires_grad_(False).eval()


def add_lora(unet, rank: int, alpha: Optional[float] = None, targets: Sequence[str] = LORA_TARGETS,
             init: str = "gaussian") -> list[tuple[str, torch.nn.Parameter]]:
    """Freeze ``unet``, add a peft LoRA adapter, return its ``(name, parameter)`` list (fp32)."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank if alpha is None else alpha,
                                init_lora_weights=init, target_modules=list(targets)))
    named = [(n, p) for n, p in unet.named_parameters() if p.requires_grad]
    for _, p in named:
        p.data = p.data.float()
    return named


def lora_state_dict(unet, state_dict: Optional[dict] = None) -> dict[str, torch.Tensor]:
    """The adapter weights in peft naming (used inside checkpoints); ``state_dict``: the UNet's whole
    state dict to take them from (under FSDP: gathered by :func:`adpo_train.fsdp.full_state_dict`)."""
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().contiguous().cpu()
            for k, v in get_peft_model_state_dict(unet, state_dict=state_dict).items()}


def load_lora_state_dict(unet, state: dict[str, torch.Tensor]) -> None:
    from peft.utils import set_peft_model_state_dict

    result = set_peft_model_state_dict(unet, state, adapter_name="default")
    unexpected = getattr(result, "unexpected_keys", None) or []
    if unexpected:
        raise ValueError(f"LoRA checkpoint has unexpected keys, e.g. {unexpected[:3]}")


def save_lora_diffusers(unet, out_dir: str, state_dict: Optional[dict] = None) -> str:
    """Write ``pytorch_lora_weights.safetensors`` loadable by ``StableDiffusionPipeline.load_lora_weights``
    (or the SDXL pipeline's), with the adapter's ``lora_alpha``: the loaded LoRA adds
    ``(alpha / r) * B @ A`` to each weight, as in training.

    diffusers reads alpha from the adapter metadata stored in the safetensors header
    (``unet_lora_adapter_metadata``, diffusers >= 0.35).  Where ``save_lora_weights`` has no such
    argument the scale ``alpha / r`` is folded into ``B`` instead, which every loader reads as
    alpha = r: the same weights either way.  ``state_dict``: as :func:`lora_state_dict`'s.
    """
    import inspect

    from diffusers.loaders import StableDiffusionLoraLoaderMixin
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    state = {k: v.detach().float().cpu().contiguous()
             for k, v in convert_state_dict_to_diffusers(
                 get_peft_model_state_dict(unet, state_dict=state_dict)).items()}
    config = unet.peft_config["default"]
    kw = {}
    if "unet_lora_adapter_metadata" in inspect.signature(StableDiffusionLoraLoaderMixin.save_lora_weights).parameters:
        meta = config.to_dict()
        for k, v in meta.items():  # peft keeps these as sets: their order follows PYTHONHASHSEED
            if isinstance(v, (set, frozenset)):
                meta[k] = sorted(v)
        kw["unet_lora_adapter_metadata"] = meta
    elif config.lora_alpha != config.r:
        scale = config.lora_alpha / config.r
        state = {k: v * scale if "lora_B" in k or "lora.up" in k else v for k, v in state.items()}
    StableDiffusionLoraLoaderMixin.save_lora_weights(out_dir, unet_lora_layers=state, safe_serialization=True,
                                                     weight_name=LORA_WEIGHT_NAME, **kw)
    path = os.path.join(out_dir, LORA_WEIGHT_NAME)
    _sort_safetensors_metadata(path)
    return path


def _sort_safetensors_metadata(path: str) -> None:
    """Rewrite the header of the safetensors file ``path`` with its ``__metadata__`` keys sorted.

    safetensors writes the metadata from a Rust HashMap, whose order changes from process to
    process: the same LoRA gave different bytes.  Tensor offsets are relative to the data
    section, so only the header (padded with spaces to 8 bytes, as safetensors does) changes."""
    import json
    import struct

    with open(path, "rb") as f:
        blob = f.read()
    n = struct.unpack("<Q", blob[:8])[0]
    header = json.loads(blob[8:8 + n])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + blob[8 + n:])
    os.replace(tmp, path)


def encoder_fingerprint(path: str, vae_path: Optional[str] = None) -> str:
    """A short hash of the VAE and text encoder(s) of a model folder: their configs, weight file names
    and sizes, and each weight file's first 64 KiB (the safetensors header and the first tensors).
    A latent cache records it; training checks it against the model it is given."""
    import hashlib

    h = hashlib.sha256()
    for sub in ("vae", "text_encoder", "text_encoder_2"):
        folder = vae_path if sub == "vae" and vae_path else os.path.join(path, sub)
        if not os.path.isdir(folder):
            continue
        for name in sorted(os.listdir(folder)):
            full = os.path.join(folder, name)
            if not os.path.isfile(full):
                continue
            h.update(f"{sub}/{name}:{os.path.getsize(full)}".encode())
            with open(full, "rb") as f:
                h.update(f.read(1 << 16))
    return h.hexdigest()[:16]


# -- random-init UNets from a named or JSON config (throughput without downloading weights) --------
# The SD1.5 and SDXL UNet architectures (the published config.json values that define the shapes);
# "tiny" and "tiny-sdxl" are the toy models' UNets (CPU tests and the CPU benchmark).
UNET_CONFIGS = {
    "sd15": dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280, 1280),
                 down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                   "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                 cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32),
    "sdxl": dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                 block_out_channels=(320, 640, 1280),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
                 cross_attention_dim=2048, use_linear_projection=True, addition_embed_type="text_time",
                 addition_embed_type_num_heads=64, addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816, norm_num_groups=32),
    "tiny": dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                 attention_head_dim=8, norm_num_groups=32),
    # Two 32-wide text encoders (hidden states concatenated: 64), pooled 32 + 6 time ids x 8.
    "tiny-sdxl": dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
                      block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                      up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=64,
                      attention_head_dim=8, norm_num_groups=32, use_linear_projection=True,
                      addition_embed_type="text_time", addition_time_embed_dim=8,
                      projection_class_embeddings_input_dim=32 + 6 * 8),
}
# Text-conditioning shapes of each named config: (tokens, width, pooled width or None).
TEXT_SHAPES = {"sd15": (77, 768, None), "sdxl": (77, 2048, 1280), "tiny": (16, 32, None),
               "tiny-sdxl": (16, 64, 32)}


def unet_config(spec: str) -> dict:
    """A ``UNet2DConditionModel`` config from a name in :data:`UNET_CONFIGS` or a JSON file."""
    import json

    if spec in UNET_CONFIGS:
        return dict(UNET_CONFIGS[spec])
    if os.path.isfile(spec):
        with open(spec) as f:
            cfg = json.load(f)
        return {k: v for k, v in cfg.items() if not k.startswith("_")}
    raise ValueError(f"--unet_config: {spec!r} is neither one of {sorted(UNET_CONFIGS)} nor a JSON file")


def build_unet(spec: str, seed: int = 0):
    """A randomly initialised ``UNet2DConditionModel`` (fixed seed) from :func:`unet_config`."""
    from diffusers import UNet2DConditionModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return UNet2DConditionModel(**unet_config(spec))


def text_shape(spec_or_unet) -> tuple[int, int, Optional[int]]:
    """``(tokens, width, pooled width or None)`` of the conditioning a UNet expects."""
    if isinstance(spec_or_unet, str) and spec_or_unet in TEXT_SHAPES:
        return TEXT_SHAPES[spec_or_unet]
    cfg = unet_config(spec_or_unet) if isinstance(spec_or_unet, str) else dict(spec_or_unet.config)
    pooled = None
    if cfg.get("addition_embed_type") == "text_time":
        pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
    return 77, cfg["cross_attention_dim"], pooled


def locate_model(name: str, revision: Optional[str] = None, cache_dir: Optional[str] = None,
                 flag: str = "--pretrained_model_name_or_path") -> str:
    """A local folder as it is, or a hub repo id's snapshot already in the local Hugging Face cache
    (``--revision``, ``--cache_dir``, as diffusers' scripts; nothing is downloaded)."""
    from .errors import MissingInput, UserError

    if os.path.isdir(name):
        if revision:
            raise UserError(f"--revision {revision!r} applies to a hub repo id in the local cache; {flag} "
                            f"{name!r} is a folder")
        return name
    if name.count("/") == 1 and not name.startswith((".", "/")):
        try:
            from huggingface_hub import snapshot_download

            return snapshot_download(name, revision=revision, cache_dir=cache_dir, local_files_only=True)
        except Exception:  # noqa: BLE001 - any failure means: not in the local cache
            pass
    raise MissingInput(f"{flag}: {name!r} is neither a local folder nor a repo id in the local Hugging Face cache"
                       f"{' ' + repr(cache_dir) if cache_dir else ''}. This trainer never downloads; fetch it first "
                       f"(e.g. `huggingface-cli download {name} --local-dir DIR`).")


# -- SDXL: two text encoders, pooled embeddings, micro-conditioning --------------------------------
def is_sdxl_folder(path: str) -> bool:
    return os.path.isdir(os.path.join(path, "text_encoder_2"))


def set_attention(unet, kind: str = "sdpa", log=print) -> str:
    """``sdpa``: PyTorch scaled_dot_product_attention (diffusers' default processor, flash/mem-efficient
    kernels on CUDA).  ``xformers``: only when xformers imports and its kernels load; else SDPA."""
    if kind == "xformers":
        try:
            unet.enable_xformers_memory_efficient_attention()
            return "xformers"
        except Exception as e:  # noqa: BLE001 - a broken xformers build must not stop training
            log(f"note: xformers unavailable ({type(e).__name__}: {str(e)[:120]}); using PyTorch SDPA")
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet.set_attn_processor(AttnProcessor2_0())
    return "sdpa"
