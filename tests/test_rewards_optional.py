"""The HPSv2 scorer (``--reward hpsv2=FILE``) through open_clip, when open_clip is installed.

open_clip is optional (it needs torchvision, which the development environment leaves out: it changes
which image processors transformers picks).  Where it is installed this checks the scorer against a
direct open_clip computation, HPSv2's score (the cosine of the normalised image and text
embeddings), on a tiny random open_clip model of a config registered here: HPSv2's own ViT-H-14 is
1 B parameters.  The missing-package error is tested in tests/test_evaluate.py.
"""
import json

import numpy as np
import pytest

open_clip = pytest.importorskip("open_clip", reason="open_clip (the optional hpsv2 reward's package) is not installed")

ARCH = "adpo-tiny-hps"
CONFIG = {"embed_dim": 16,
          "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
          "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2}}


def test_hpsv2_scores_match_open_clip(tmp_path):
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
