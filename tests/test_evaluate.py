"""``adpo-train evaluate``: scores against a direct CLIP computation, results.json, reuse and resume,
refusals, the optional scorers, the toy reward and the prompt reader (tiny toy pipeline, 16 px)."""
import csv
import io
import json
import os
import shutil

import numpy as np
import pytest

from tests.test_train_fixtures import require_trainer_packages, root, toy_assets

PROMPTS = ["a red circle", "a blue square", "a green triangle"]


def _tiny_clip(path: str) -> str:
    """A random 2-layer CLIPModel + CLIPProcessor folder (the toy's synthetic tokenizer), built offline."""
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPTokenizer

    try:
        from transformers import CLIPImageProcessorPil as ImageProcessor  # transformers 5 without torchvision
    except ImportError:
        from transformers import CLIPImageProcessor as ImageProcessor
    from adpo_train import toy

    toy.write_tokenizer(os.path.join(path, "tok"))
    tok = CLIPTokenizer.from_pretrained(os.path.join(path, "tok"), local_files_only=True)
    torch.manual_seed(0)
    cfg = CLIPConfig(text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_attention_heads=4,
                                      num_hidden_layers=2, max_position_embeddings=toy.MAX_TOKENS,
                                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                      pad_token_id=tok.pad_token_id),
                     vision_config=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4,
                                        num_hidden_layers=2, image_size=16, patch_size=4),
                     projection_dim=16)
    CLIPModel(cfg).save_pretrained(path)
    proc = CLIPProcessor(image_processor=ImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}),
                         tokenizer=tok)
    proc.save_pretrained(path)
    return path


def _assets() -> dict:
    """The toy model, a LoRA with random (non-zero) B so tuned != base, a prompt file, a tiny CLIP."""
    a = dict(toy_assets())
    base = os.path.join(root(), "evaluate")
    a["clip"] = _tiny_clip(os.path.join(base, "clip"))
    a["lora"] = os.path.join(base, "run")
    if not os.path.isfile(os.path.join(a["lora"], "pytorch_lora_weights.safetensors")):
        import torch

        from adpo_train.models import add_lora, load_unet, save_lora_diffusers

        unet = load_unet(a["model"])
        torch.manual_seed(1)
        for n, p in add_lora(unet, 4):
            if "lora_B" in n:
                p.data.normal_(0, 0.2)
        save_lora_diffusers(unet, a["lora"])
    a["prompts"] = os.path.join(base, "prompts.txt")
    with open(a["prompts"], "w") as f:
        f.write("\n".join(PROMPTS[:2]) + "\n\n" + PROMPTS[2] + "\n")
    return a


def _argv(a, out, *extra):
    return ["evaluate", "--pretrained_model_name_or_path", a["model"], "--lora", a["lora"], "--prompts", a["prompts"],
            "--reward", f"clip={a['clip']}", "--reward", "toy", "--num_images_per_prompt", "2",
            "--num_inference_steps", "2", "--batch_size", "4", "--seed", "7", "--output_dir", str(out), "--quiet",
            *extra]


def _run(argv, capsys=None):
    from adpo_train.cli import main

    rc = main(argv)
    return rc


def _rows(out):
    with open(os.path.join(out, "scores.csv")) as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    require_trainer_packages()
    a = _assets()
    out = tmp_path_factory.mktemp("eval") / "out"
    assert _run(_argv(a, out)) == 0
    return a, out


def test_scores_match_direct_clip(evaluated):
    import torch
    from PIL import Image
    from transformers import CLIPModel, CLIPProcessor

    a, out = evaluated
    rows = _rows(out)
    assert len(rows) == 2 * 2 * len(PROMPTS) * 2  # rewards x models x prompts x images
    assert list(rows[0]) == ["prompt", "seed", "model", "reward", "image", "score"]
    model = CLIPModel.from_pretrained(a["clip"]).eval()
    proc = CLIPProcessor.from_pretrained(a["clip"])
    clip_rows = [r for r in rows if r["reward"] == "clip"]
    with torch.no_grad():
        for r in clip_rows:
            pix = proc(images=[Image.open(out / r["image"]).convert("RGB")], return_tensors="pt")["pixel_values"]
            ids = proc.tokenizer([r["prompt"]], return_tensors="pt", padding=True)
            img = model.visual_projection(model.vision_model(pixel_values=pix).pooler_output)
            txt = model.text_projection(model.text_model(**ids).pooler_output)
            cos = torch.nn.functional.cosine_similarity(img, txt).item()
            assert float(r["score"]) == pytest.approx(model.logit_scale.exp().item() * cos, rel=1e-5, abs=1e-6)
    # paired: the same seeds for base and tuned, one seed per (prompt, image)
    seeds = {(r["prompt"], r["model"]): [] for r in clip_rows}
    for r in clip_rows:
        seeds[(r["prompt"], r["model"])].append(int(r["seed"]))
    for p in PROMPTS:
        assert seeds[(p, "base")] == seeds[(p, "tuned")]
    assert len({int(r["seed"]) for r in clip_rows}) == len(PROMPTS) * 2


def test_results_json_and_cis(evaluated):
    _, out = evaluated
    res = json.load(open(out / "results.json"))
    assert set(res["rewards"]) == {"clip", "toy"}
    rows = _rows(out)
    for name, r in res["rewards"].items():
        assert set(r) == {"base", "tuned", "win_rate", "win_rate_ci95"}
        for w in ("base", "tuned"):
            scores = [float(x["score"]) for x in rows if x["reward"] == name and x["model"] == w]
            assert r[w]["mean"] == pytest.approx(np.mean(scores))
            lo, hi = r[w]["ci95"]
            assert min(scores) <= lo <= r[w]["mean"] <= hi <= max(scores)
        lo, hi = r["win_rate_ci95"]
        assert 0 <= lo <= r["win_rate"] <= hi <= 1
    assert res["settings"]["seed"] == 7 and res["settings"]["num_images_per_prompt"] == 2
    assert (out / "grid.png").stat().st_size > 100
    assert not list(out.rglob("*.tmp*"))


def test_summarise_win_rate_ties_half_and_bootstrap():
    from adpo_train.evaluate import summarise

    base = np.array([[0.0, 1.0], [2.0, 2.0], [5.0, 0.0]])
    tuned = np.array([[1.0, 1.0], [1.0, 3.0], [5.0, 0.0]])
    r = summarise(base, tuned)
    assert r["win_rate"] == pytest.approx((1 + 0.5 + 0 + 1 + 0.5 + 0.5) / 6)
    again = summarise(base, tuned)
    assert r == again  # fixed bootstrap seed
    # a constant per-prompt value has a zero-width CI
    assert summarise(np.ones((4, 2)), np.ones((4, 2)))["base"]["ci95"] == [1.0, 1.0]


def test_rerun_reuses_images_and_gives_same_numbers(evaluated, capsys):
    a, out = evaluated
    pngs = sorted(out.glob("images/*/*.png"))
    assert len(pngs) == 2 * len(PROMPTS) * 2
    mtimes = [p.stat().st_mtime_ns for p in pngs]
    before = (out / "scores.csv").read_text(), json.load(open(out / "results.json"))
    capsys.readouterr()
    assert _run(_argv(a, out)) == 0
    assert "0 images drawn, 12 reused" in capsys.readouterr().out
    assert [p.stat().st_mtime_ns for p in pngs] == mtimes
    assert ((out / "scores.csv").read_text(), json.load(open(out / "results.json"))) == before


def test_interrupted_run_continues(evaluated, tmp_path, monkeypatch, capsys):
    """Killed after 3 images (mid-batch): the rerun draws the rest and matches the uninterrupted run."""
    from adpo_train import evaluate

    a, full = evaluated
    out = tmp_path / "out"
    real, saved = evaluate._save_png, []

    def flaky(image, path):
        if len(saved) == 3:
            raise KeyboardInterrupt
        real(image, path)
        saved.append(path)

    monkeypatch.setattr(evaluate, "_save_png", flaky)
    assert _run(_argv(a, out)) == 130
    monkeypatch.setattr(evaluate, "_save_png", real)
    assert len(list(out.glob("images/*/*.png"))) == 3 and not (out / "results.json").exists()
    capsys.readouterr()
    assert _run(_argv(a, out)) == 0
    assert "9 images drawn, 3 reused" in capsys.readouterr().out
    assert (out / "scores.csv").read_text() == (full / "scores.csv").read_text()


def _error(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[0].startswith("adpo-train: error: ")
    return err[0]


@pytest.mark.parametrize("case,match", [
    ("prompts", "--prompts: "), ("lora", "--lora: "), ("reward", "--reward 'bogus=x': unknown reward"),
    ("reward_path", "--reward 'clip': expected clip=PATH"), ("clip_dir", "--reward clip: "),
    ("images", "--num_images_per_prompt: expected >= 1"), ("model", "--pretrained_model_name_or_path: "),
    ("processor", "--reward_processor pickscore: no --reward pickscore"),
])
def test_bad_flags_exit_2_with_one_line(case, match, tmp_path, capsys):
    require_trainer_packages()
    a = _assets()
    argv = _argv(a, tmp_path / "out")
    swap = {"prompts": ("--prompts", str(tmp_path / "none.txt")), "lora": ("--lora", str(tmp_path)),
            "reward": ("toy", "bogus=x"), "reward_path": ("toy", "clip"), "images": ("--num_images_per_prompt", "0"),
            "clip_dir": (f"clip={a['clip']}", f"clip={tmp_path}"),
            "model": ("--pretrained_model_name_or_path", str(tmp_path / "nomodel"))}
    if case == "processor":
        argv += ["--reward_processor", f"pickscore={a['clip']}"]
    else:
        flag, value = swap[case]
        j = argv.index(flag)
        argv[j + (0 if flag in ("toy", f"clip={a['clip']}") else 1)] = value
    assert _run(argv) == 2
    assert match in _error(capsys)
    assert not (tmp_path / "out").exists()  # refused before anything was written


def test_foreign_and_mismatched_output_dir_refused(evaluated, tmp_path, capsys):
    a, out = evaluated
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert _run(_argv(a, foreign)) == 2
    assert "--output_dir: " in _error(capsys) and (foreign / "notes.txt").read_text() == "keep me"
    assert os.listdir(foreign) == ["notes.txt"]
    # the same OUT with another generation setting: refused, naming the flag
    assert _run(_argv(a, out, "--num_inference_steps", "3")) == 2
    assert _error(capsys).startswith("adpo-train: error: --num_inference_steps: ")
    # --overwrite_output_dir starts afresh in this package's evaluation folder
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    assert _run(_argv(a, copy, "--seed", "8", "--max_prompts", "1", "--overwrite_output_dir")) == 0
    assert len(list(copy.glob("images/*/*.png"))) == 4


@pytest.mark.parametrize("name,package", [("hpsv2", "open-clip-torch"), ("imagereward", "image-reward")])
def test_missing_optional_package_one_line(name, package, tmp_path, monkeypatch, capsys):
    import sys

    from adpo_train import rewards

    module = rewards.PACKAGES[name][0]
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
    ckpt = tmp_path / "ckpt.pt"
    ckpt.write_bytes(b"x")
    with pytest.raises(rewards.UserError, match=rf"--reward {name}: needs the '{package}' package"):
        rewards.load_scorer(name, str(ckpt))


def test_aesthetic_scorer_matches_mlp_on_clip_embeds(tmp_path):
    import torch
    from PIL import Image
    from transformers import CLIPModel, CLIPProcessor

    from adpo_train import rewards

    require_trainer_packages()
    a = _assets()
    folder = tmp_path / "aesthetic"
    shutil.copytree(a["clip"], folder / "clip")
    torch.manual_seed(0)
    state = {"layers.0.weight": torch.randn(8, 16), "layers.0.bias": torch.randn(8),
             "layers.2.weight": torch.randn(1, 8), "layers.2.bias": torch.randn(1)}
    torch.save(state, folder / "sac+logos+ava1-l14-linearMSE.pth")
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)) for _ in range(3)]
    got = rewards.load_scorer("aesthetic", str(folder))(images, PROMPTS)
    model, proc = CLIPModel.from_pretrained(a["clip"]).eval(), CLIPProcessor.from_pretrained(a["clip"])
    with torch.no_grad():
        pix = proc(images=images, return_tensors="pt")["pixel_values"]
        e = model.visual_projection(model.vision_model(pixel_values=pix).pooler_output)
        e = e / e.norm(dim=-1, keepdim=True)
        want = (e @ state["layers.0.weight"].T + state["layers.0.bias"]) @ state["layers.2.weight"].T + state["layers.2.bias"]
    np.testing.assert_allclose(got, want[:, 0].numpy(), rtol=1e-5, atol=1e-6)


def test_toy_reward_prefers_the_toy_preference():
    from PIL import Image

    from adpo_train import rewards, toy

    cols = toy.toy_records(64, num_ties=0, num_corrupt=0)
    margins = []
    for cap, j0, j1, label in zip(cols["caption"], cols["jpg_0"], cols["jpg_1"], cols["label_0"]):
        win, lose = (j0, j1) if label == 1.0 else (j1, j0)
        s = [rewards.toy_reward(Image.open(io.BytesIO(b)), cap) for b in (win, lose)]
        margins.append(s[0] - s[1])
    assert min(margins) > 0, margins  # every winner above its loser
    # the training resolution too (the toy generates 16 px images)
    img = Image.open(io.BytesIO(cols["jpg_0"][0])).resize((16, 16))
    assert -1 <= rewards.toy_reward(img, cols["caption"][0]) <= 1
    assert rewards.toy_reward(img, "a photo") == 0.0


def test_read_prompts_txt_and_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from adpo_train.errors import UserError
    from adpo_train.evaluate import read_prompts

    txt = tmp_path / "p.txt"
    txt.write_text(" a cat \n\n\na dog\n")
    assert read_prompts(str(txt)) == ["a cat", "a dog"]
    d = tmp_path / "shards"
    d.mkdir()
    pq.write_table(pa.table({"caption": ["b", "a", "b"], "jpg_0": [b"x"] * 3}), d / "0.parquet")
    pq.write_table(pa.table({"caption": ["c", "a", ""], "jpg_0": [b"y"] * 3}), d / "1.parquet")
    assert read_prompts(str(d / "0.parquet")) == ["b", "a"]
    assert read_prompts(str(d)) == ["b", "a", "c"]
    assert read_prompts(str(d), max_prompts=2) == ["b", "a"]
    pq.write_table(pa.table({"text": ["x"]}), tmp_path / "bad.parquet")
    with pytest.raises(UserError, match="--prompts: .* no 'caption' column"):
        read_prompts(str(tmp_path / "bad.parquet"))
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(UserError, match="--prompts: .* holds no prompts"):
        read_prompts(str(tmp_path / "empty.txt"))


def test_same_unet_as_full_finetune_gives_identical_pairs(evaluated, tmp_path):
    """``--unet`` = the base model's own UNet: every tuned image equals its base twin pixel for pixel
    (the same seed per prompt and image), so every pair ties and the win rate is exactly 0.5."""
    from PIL import Image

    a, _ = evaluated
    out = tmp_path / "out"
    argv = _argv(a, out)
    j = argv.index("--lora")
    argv[j:j + 2] = ["--unet", os.path.join(a["model"], "unet")]
    assert _run(argv) == 0
    for base in sorted(out.glob("images/base/*.png")):
        tuned = out / "images" / "tuned" / base.name
        assert np.array_equal(np.asarray(Image.open(base)), np.asarray(Image.open(tuned))), base.name
    res = json.load(open(out / "results.json"))
    for r in res["rewards"].values():
        assert r["win_rate"] == 0.5 and r["win_rate_ci95"] == [0.5, 0.5]
        assert r["base"] == r["tuned"]


def test_bootstrap_resamples_prompts_not_images():
    """With K identical images per prompt, the CI must be as wide as the prompts' spread allows:
    about mean +- 1.96 sd / sqrt(prompts) (normal approximation), not / sqrt(prompts * K)."""
    from adpo_train.evaluate import summarise

    rng = np.random.default_rng(1)
    n, K = 400, 4
    per_prompt = rng.normal(size=n)
    base = np.repeat(per_prompt[:, None], K, 1)
    r = summarise(base, base + 1.0)
    lo, hi = r["base"]["ci95"]
    half = 1.96 * per_prompt.std(ddof=1) / np.sqrt(n)
    assert (hi - lo) / 2 == pytest.approx(half, rel=0.1)
    assert (lo + hi) / 2 == pytest.approx(per_prompt.mean(), abs=0.2 * half)
    assert r["win_rate"] == 1.0 and r["win_rate_ci95"] == [1.0, 1.0]
    # wins over images of a prompt: half the prompts won on every image, half lost on every one
    tuned = base + np.where(np.arange(n) % 2 == 0, 1.0, -1.0)[:, None]
    w = summarise(base, tuned)
    assert w["win_rate"] == 0.5
    lo, hi = w["win_rate_ci95"]
    assert (hi - lo) / 2 == pytest.approx(1.96 * 0.5 / np.sqrt(n), rel=0.1)


def test_toy_vae_decodes_what_the_toy_reward_sees():
    """The toy VAE's pre-training (toy.pretrain_vae) is what lets an image-space reward see the toy
    UNet at all: through a random VAE a winner and its loser decode to the same coloured noise (the
    toy reward then separates half the pairs, margin ~0); after 60 of the recipe's 200 steps the
    decoded winners already score above their losers on most pairs."""
    import torch
    from PIL import Image

    from adpo_train import rewards, toy

    require_trainer_packages()
    cols = toy.toy_records(32, num_ties=0, num_corrupt=0)
    images, captions = [], []
    for cap, j0, j1, label in zip(cols["caption"], cols["jpg_0"], cols["jpg_1"], cols["label_0"]):
        for b in ((j0, j1) if label == 1.0 else (j1, j0)):  # winner, loser
            images.append(np.asarray(Image.open(io.BytesIO(b)).convert("RGB").resize((toy.RESOLUTION,) * 2,
                                                                                     Image.BICUBIC)))
            captions.append(cap)
    x = torch.tensor(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0

    def margins(vae):
        with torch.no_grad():
            rec = vae.decode(vae.encode(x).latent_dist.mean).sample
        rec = ((rec.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        s = np.array([rewards.toy_reward(Image.fromarray(a), c) for a, c in zip(rec, captions)]).reshape(-1, 2)
        return s[:, 0] - s[:, 1]

    vae = toy.build_toy_components(os.path.join(root(), "vae-test-tok"), pretrain_steps=0)["vae"]
    before = margins(vae)
    assert abs(before.mean()) < 0.02 and (before > 0).mean() < 0.7, before  # the random decoder: no signal
    losses = toy.pretrain_vae(vae, 60)
    toy.calibrate_vae(vae)
    after = margins(vae)
    assert losses[-1] < losses[0] / 2
    assert (after > 0).mean() >= 0.75 and after.mean() > 0.05, after


def test_bench_experiment_check_min_win_ci_lo():
    """`python -m bench experiment --min-win-ci-lo 0.5` (the demo's check) fails on a run whose
    win-rate CI reaches 0.5, naming it, and passes when every CI lies above."""
    import argparse

    from bench import experiment

    rows = [dict(method="adaptive", flip_rate=0.2, seed=0, win_rate=0.75, win_ci_lo=0.604, win_ci_hi=0.875),
            dict(method="dpo", flip_rate=0.4, seed=0, win_rate=0.618, win_ci_lo=0.493, win_ci_hi=0.729)]
    assert experiment.check(argparse.Namespace(min_win_ci_lo=None), rows) is None
    assert experiment.check(argparse.Namespace(min_win_ci_lo=0.5), rows[:1]) is None
    failure = experiment.check(argparse.Namespace(min_win_ci_lo=0.5), rows)
    assert "dpo at flip 0.4" in failure and "adaptive" not in failure
    assert experiment.check(argparse.Namespace(min_win_ci_lo=0.5), [dict(rows[0], win_ci_lo=0.5)])  # not above
