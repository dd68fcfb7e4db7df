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
    if not os.path.isdir(path) or not os.path.isdir(os.path.join(path, "unet")):
        raise FileNotFoundError(
            f"--pretrained_model_name_or_path: expected a local diffusers-format folder with unet/, vae/, "
            f"text_encoder/, tokenizer/ and scheduler/ subfolders, got {path!r}. This trainer never downloads; "
            f"fetch the model first (e.g. `huggingface-cli download <repo> --local-dir DIR`).")
    return path


def load_unet(path: str, variant: Optional[str] = None):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(check_local_model(path), subfolder="unet", variant=variant,
                                                local_files_only=True, use_safetensors=True)


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


def lora_state_dict(unet) -> dict[str, torch.Tensor]:
    """The adapter weights in peft naming (used inside checkpoints)."""
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().contiguous().cpu() for k, v in get_peft_model_state_dict(unet).items()}


def load_lora_state_dict(unet, state: dict[str, torch.Tensor]) -> None:
    from peft.utils import set_peft_model_state_dict

    result = set_peft_model_state_dict(unet, state, adapter_name="default")
    unexpected = getattr(result, "unexpected_keys", None) or []
    if unexpected:
        raise ValueError(f"LoRA checkpoint has unexpected keys, e.g. {unexpected[:3]}")


def save_lora_diffusers(unet, out_dir: str) -> str:
    """Write ``pytorch_lora_weights.safetensors`` loadable by ``StableDiffusionPipeline.load_lora_weights``."""
    from diffusers.loaders import StableDiffusionLoraLoaderMixin
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionLoraLoaderMixin.save_lora_weights(out_dir, unet_lora_layers=state, safe_serialization=True,
                                                     weight_name=LORA_WEIGHT_NAME)
    return os.path.join(out_dir, LORA_WEIGHT_NAME)
