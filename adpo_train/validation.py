"""``--run_validation``: images of the validation prompts with the LoRA as it is now.

Every ``--validation_steps`` optimisation steps and at the end, the model folder's pipeline
(``StableDiffusionPipeline`` or ``StableDiffusionXLPipeline``) runs with the UNet being
trained (adapters on), diffusers' ``DPMSolverMultistepScheduler``, a fixed seed per prompt,
and writes one PNG grid (a column per prompt) to ``OUTPUT_DIR/validation/step-NNNNNN.png``
(``-final.png`` at the end);
the trackers get the same images (tensorboard ``add_images``, wandb ``Image``).  The final
call adds a row without the LoRA, as diffusers' script does.  The global RNG state is left
as it was, so validation does not change the training run.
"""
from __future__ import annotations

import os

import torch

# the prompts of diffusers' train_diffusion_dpo.py
DEFAULT_PROMPTS = [
    "portrait photo of a girl, photograph, highly detailed face, depth of field, moody light, golden hour, "
    "style by Dan Winters, Russell James, Steve McCurry, centered, extremely detailed, Nikon D850, award winning "
    "photography",
    "Self-portrait oil painting, a beautiful cyborg with golden hair, 8k",
    "Astronaut in a jungle, cold color palette, muted colors, detailed, 8k",
    "A photo of beautiful mountain with realistic sunset and blue lake, highly detailed, masterpiece",
]


class Validator:
    def __init__(self, config, unet, device, weight_dtype, trackers_of=lambda: []):
        self.config, self.unet, self.device, self.dtype = config, unet, device, weight_dtype
        self.prompts = config.validation_prompts or DEFAULT_PROMPTS
        self.trackers_of = trackers_of
        self.pipe = None
        self.out_dir = os.path.join(config.output_dir, "validation")

    def _pipeline(self):
        if self.pipe is None:
            self.pipe = load_pipeline(self.config.pretrained_model_name_or_path, self.device, self.dtype,
                                      self.config.variant, self.config.pretrained_vae_model_name_or_path,
                                      unet=self.unet)
        return self.pipe

    def _images(self, pipe) -> list:
        res = self.config.validation_resolution or self.config.resolution
        out = []
        for i, prompt in enumerate(self.prompts):
            g = torch.Generator(device=self.device).manual_seed(self.config.seed + i)
            out.append(pipe(prompt, num_inference_steps=self.config.validation_inference_steps, height=res,
                            width=res, guidance_scale=self.config.validation_guidance_scale, generator=g).images[0])
        return out

    def run(self, step: int, final: bool = False) -> str:
        """Generate, save the grid, log to the trackers; returns the PNG path."""
        pipe = self._pipeline()
        was_training = self.unet.training
        self.unet.eval()
        try:
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                rows = [self._images(pipe)]
                if final:
                    self.unet.disable_adapters()
                    try:
                        rows.append(self._images(pipe))
                    finally:
                        self.unet.enable_adapters()
        finally:
            self.unet.train(was_training)
        path = os.path.join(self.out_dir, f"step-{step:06d}{'-final' if final else ''}.png")
        os.makedirs(self.out_dir, exist_ok=True)
        grid(rows).save(path)
        self._log(rows, step, final)
        return path

    def _log(self, rows, step: int, final: bool) -> None:
        import numpy as np

        key = "test" if final else "validation"
        for tracker in self.trackers_of():
            if tracker.name == "tensorboard":
                tracker.writer.add_images(key, np.stack([np.asarray(im) for im in rows[0]]), step,
                                          dataformats="NHWC")
            elif tracker.name == "wandb":
                import wandb

                tracker.log({key: [wandb.Image(im, caption=f"{i}: {p}")
                                   for i, (im, p) in enumerate(zip(rows[0], self.prompts))]}, step=step)


def load_pipeline(model: str, device, dtype, variant=None, vae_path=None, unet=None):
    """The model folder's pipeline (SD or SDXL, from its ``model_index.json``), local files only, no
    safety checker, diffusers' ``DPMSolverMultistepScheduler``, no progress bar; ``unet``: use this UNet
    (the one being trained), ``vae_path``: an ``AutoencoderKL`` folder of its own."""
    from diffusers import DiffusionPipeline, DPMSolverMultistepScheduler

    from .models import dtype_kwargs

    kw = dict(local_files_only=True, use_safetensors=True, **dtype_kwargs(dtype))
    if unet is not None:
        kw["unet"] = unet
    if variant:
        kw["variant"] = variant
    if vae_path:  # the VAE the run encodes with
        from .models import load_vae

        kw["vae"] = load_vae(None, variant, vae_path).to(dtype)
    pipe = DiffusionPipeline.from_pretrained(model, **kw)
    if hasattr(pipe, "safety_checker"):
        pipe.safety_checker = None
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def grid(rows: list[list]):
    """One image: ``rows`` of PIL images, pasted left to right, top to bottom."""
    from PIL import Image

    w, h = rows[0][0].size
    out = Image.new("RGB", (w * max(len(r) for r in rows), h * len(rows)))
    for r, images in enumerate(rows):
        for c, im in enumerate(images):
            out.paste(im, (c * w, r * h))
    return out
