"""Issue 6: SDXL-style models (two text encoders, pooled embeddings, micro-conditioning
time_ids), cached like SD1.5, on a tiny SDXL-style UNet (addition_embed_type="text_time")
built offline."""
import json
import os

import torch

from tests.test_train_fixtures import root, run_trainer


def _sdxl_assets():
    from adpo_train import toy
    from adpo_train.cache import build_cache

    base = os.path.join(root(), "sdxl")
    model = toy.write_toy_model(os.path.join(base, "model"), kind="sdxl")
    data = os.path.join(base, "data.parquet")
    if not os.path.isfile(data):
        toy.write_toy_dataset(data, 12)
    cache = os.path.join(base, "cache")
    if not os.path.isfile(os.path.join(cache, "index.json")):
        build_cache(model, data, cache, resolution=32, batch_size=8, device="cpu", log=lambda *a: None)
    return model, data, cache


def test_sdxl_cache_and_training(tmp_path):
    from safetensors.torch import load_file

    model, data, cache = _sdxl_assets()
    index = json.load(open(os.path.join(cache, "index.json")))
    assert index["sdxl"] and index["num_pairs"] == 12
    from adpo_train.data import CachedPairDataset, collate_cached

    # cache v2: text and pooled once per caption (text shards), read back per pair by the dataset
    n = index["num_pairs"]
    shard = collate_cached([CachedPairDataset(cache)[i] for i in range(n)])
    assert load_file(os.path.join(cache, index["text_shards"][0]["file"]))["text"].shape[1:] == (16, 64)
    assert shard["text"].shape == (n, 16, 64)  # both encoders' penultimate states, concatenated
    assert shard["pooled"].shape == (n, 32)
    assert shard["time_ids"].shape == (n, 2, 6)
    assert torch.equal(shard["time_ids"][0, 0], torch.tensor([32.0, 32, 0, 0, 32, 32]))
    # the cache holds what SDXL's recipe gives for the caption, computed here with transformers
    # alone: penultimate hidden states of both CLIP encoders, concatenated, and the second's
    # projected pooled embedding
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from adpo_train.data import PickAPicPairs

    cap = PickAPicPairs(data).raw(0)["caption"]
    hidden, pooled = [], None
    for sub, cls in (("", CLIPTextModel), ("_2", CLIPTextModelWithProjection)):
        tok = CLIPTokenizer.from_pretrained(model, subfolder="tokenizer" + sub, local_files_only=True)
        enc = cls.from_pretrained(model, subfolder="text_encoder" + sub, local_files_only=True).eval()
        ids = tok([cap], padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids
        with torch.no_grad():
            out = enc(ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2][0])
        pooled = getattr(out, "text_embeds", None)
    torch.testing.assert_close(shard["text"][0], torch.cat(hidden, dim=-1))
    torch.testing.assert_close(shard["pooled"][0], pooled[0])

    # training from the cache and from images: pooled + time_ids reach the UNet (it would raise without them)
    res = run_trainer(["--pretrained_model_name_or_path", model, "--latent_cache", cache, "--output_dir",
                       str(tmp_path / "cached"), "--train_batch_size", "4", "--max_train_steps", "3",
                       "--logging_steps", "3", "--ema_warmup_steps", "1"])
    assert res["global_step"] == 3 and os.path.isfile(res["lora"])
    row = json.loads(open(tmp_path / "cached" / "metrics.jsonl").read().splitlines()[-1])
    assert row["annotators_ready"] and row["nonfinite_micro_batches"] == 0
    res = run_trainer(["--pretrained_model_name_or_path", model, "--dataset_name", data, "--output_dir",
                       str(tmp_path / "images"), "--train_batch_size", "4", "--max_train_steps", "1",
                       "--resolution", "32"])
    assert res["global_step"] == 1


def test_sdxl_micro_conditioning_changes_the_prediction():
    from adpo_train.models import build_unet

    unet = build_unet("tiny-sdxl").eval()
    g = torch.Generator().manual_seed(0)
    x, enc, pooled = (torch.randn(s, generator=g) for s in ((2, 4, 16, 16), (2, 16, 64), (2, 32)))
    t = torch.tensor([10, 500])
    tid = torch.tensor([[32.0, 32, 0, 0, 32, 32]] * 2)
    with torch.no_grad():
        a = unet(x, t, enc, added_cond_kwargs={"text_embeds": pooled, "time_ids": tid}).sample
        b = unet(x, t, enc, added_cond_kwargs={"text_embeds": pooled, "time_ids": tid * 2}).sample
        c = unet(x, t, enc, added_cond_kwargs={"text_embeds": pooled * 0, "time_ids": tid}).sample
    assert not torch.allclose(a, b) and not torch.allclose(a, c)


def test_micro_conditioning_of_a_non_square_image():
    """time_ids = (original h, w, crop top, left, target, target): shorter side resized to R, centre crop."""
    import io

    import numpy as np
    from PIL import Image

    from adpo_train.data import decode_image
    from adpo_train.conditioning import time_ids

    buf = io.BytesIO()
    ramp = np.broadcast_to((np.arange(64) * 4).astype(np.uint8)[None, :, None], (40, 64, 3))  # value = 4 x column
    Image.fromarray(np.ascontiguousarray(ramp)).save(buf, format="PNG")  # h=40, w=64
    pixels, (orig, crop) = decode_image(buf.getvalue(), 32, with_meta=True)
    # a centre crop of a ramp keeps the middle of the ramp: columns 12.5 .. 50.5 of 64 (values ~50 .. ~202),
    # mean ~126 (-0.01 in [-1, 1]); a crop from the left edge would average ~78 (-0.39)
    assert abs(float(pixels.mean()) - (126 / 127.5 - 1)) < 0.03, float(pixels.mean())
    assert 40 < (float(pixels[:, :, 0].mean()) + 1) * 127.5 < 60 and 190 < (float(pixels[:, :, -1].mean()) + 1) * 127.5 < 215
    assert pixels.shape == (3, 32, 32) and orig == (40, 64)
    assert crop == (0, 9)  # resized to 32 x 51 (64 * 32 / 40 = 51.2), centre crop: (51 - 32) // 2 = 9 from the left
    assert time_ids(orig, crop, 32).tolist() == [40.0, 64.0, 0.0, 9.0, 32.0, 32.0]
    assert decode_image(b"not an image", 32, with_meta=True) == (None, None)
