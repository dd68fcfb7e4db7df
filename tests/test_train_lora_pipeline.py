"""LoRA round trip: the trainer's weights load into a diffusers pipeline built from the tiny parts."""
import numpy as np

from tests.test_train_fixtures import toy_assets, toy_pipeline, train_on_toy_cache


def test_lora_round_trip_into_stable_diffusion_pipeline(tmp_path):
    a = toy_assets()
    res = train_on_toy_cache(tmp_path, "--max_train_steps", "3", "--learning_rate", "5e-3", "--logging_steps", "3")
    pipe, sample = toy_pipeline(a["model"])
    base = sample()
    pipe.load_lora_weights(str(tmp_path), weight_name="pytorch_lora_weights.safetensors")
    lora = sample()
    assert np.abs(lora - base).max() > 1e-4, "the trained LoRA must change the pipeline's output"
    pipe.unload_lora_weights()
    np.testing.assert_allclose(sample(), base, rtol=0, atol=1e-6)
    assert res["global_step"] == 3
