"""The optional scorers: HPSv2 through open_clip, and ImageReward's calls.

HPSv2 (``--reward hpsv2=FILE``) runs where open_clip is installed.
open_clip is optional (it needs torchvision, which the development environment leaves out: it changes
which image processors transformers picks).  Where it is installed this checks the scorer against a
direct open_clip computation, HPSv2's score (the cosine of the normalised image and text
embeddings), on a tiny random open_clip model of a config registered here: HPSv2's own ViT-H-14 is
1 B parameters.  The missing-package errors are tested in tests/test_evaluate.py.

The image-reward package cannot run here: its BLIP model needs the ``bert-base-uncased`` tokenizer
from the hub.  A stand-in package records what the scorer asks of ImageReward's API
(``load(name, device, download_root)``, ``model.score(prompt, PIL image) -> float``, as in
THUDM/ImageReward): the checkpoint's own folder as the download root, the hub client offline
while it loads, one PIL image per call.
"""
import json

import os
import sys
import types

import numpy as np
import pytest

ARCH = "adpo-tiny-hps"
CONFIG = {"embed_dim": 16,
          "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
          "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}


def test_hpsv2_scores_match_open_clip(tmp_path):
    open_clip = pytest.importorskip("open_clip", reason="open_clip (the optional hpsv2 reward's package) is not installed")
    import torch
    from PIL import Image

    from adpo_train import rewards

    cfg_dir = tmp_path / "configs"
    cfg_dir.mkdir()
    (cfg_dir / f"{ARCH}.json").write_text(json.dumps(CONFIG))
    open_clip.add_model_config(str(cfg_dir))
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms(ARCH, pretrained=None)
    ckpt = tmp_path / "hps.pt"
    torch.save({"state_dict": model.state_dict()}, ckpt)  # HPSv2's checkpoints wrap the weights so

    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)) for _ in range(5)]
    prompts = ["a red circle", "a blue square", "a green triangle", "a photo", "a yellow circle"]
    score = rewards._hpsv2_scorer(str(ckpt), "cpu", batch_size=2, arch=ARCH)  # batches of 2, 2 and 1
    got = score(images, prompts)

    model.eval()
    tok = open_clip.get_tokenizer(ARCH)
    with torch.no_grad():
        i = model.encode_image(torch.stack([preprocess(im) for im in images]))
        t = model.encode_text(tok(prompts))
    want = torch.nn.functional.cosine_similarity(i, t, dim=-1).double().numpy()
    assert got.shape == (5,) and got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert len(set(np.round(got, 6))) == 5  # a real function of image and text, not a constant


def test_imagereward_is_loaded_offline_from_its_folder(tmp_path, monkeypatch):
    from PIL import Image

    from adpo_train import rewards

    calls = []

    class Model:
        def score(self, prompt, image):
            assert isinstance(image, Image.Image), f"score() got {type(image).__name__}, not one PIL image"
            calls.append(("score", prompt))
            return float(np.asarray(image, dtype=np.float64).mean()) + len(prompt)

    def load(name, device="cpu", download_root=None):
        calls.append(("load", name, device, download_root, os.environ.get("HF_HUB_OFFLINE")))
        return Model()

    monkeypatch.setitem(sys.modules, "ImageReward", types.SimpleNamespace(load=load))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    folder = tmp_path / "ImageReward"
    folder.mkdir()
    (folder / "ImageReward.pt").write_bytes(b"weights")
    with pytest.raises(rewards.MissingInput, match=r"lacks med_config.json"):
        rewards.load_scorer("imagereward", str(folder))
    (folder / "med_config.json").write_text("{}")
    score = rewards.load_scorer("imagereward", str(folder))
    assert calls == [("load", str(folder / "ImageReward.pt"), "cpu", str(folder), "1")]
    assert "HF_HUB_OFFLINE" not in os.environ  # restored after the load
    images = [Image.new("RGB", (8, 8), (v, v, v)) for v in (10, 200)]
    got = score(images, ["a", "abc"])
    np.testing.assert_array_equal(got, [10.0 + 1, 200.0 + 3])
    assert calls[1:] == [("score", "a"), ("score", "abc")]
    # the checkpoint file itself names the same folder
    assert rewards.load_scorer("imagereward", str(folder / "ImageReward.pt")) is not None
    assert calls[-1][3] == str(folder)
