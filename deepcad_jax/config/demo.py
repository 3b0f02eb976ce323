"""The demo: a small network trained for a few minutes on a simulated movie.

A higher learning rate than the paper's (1e-3), decaying along a cosine over 4,000 steps,
so a laptop CPU sees a real result in a few minutes: the CPU recipe for a first try on
a real recording (`--holdout 0.2` scores it; docs/training.md). `demo:quick` is a much
shorter run for tests.

  deepcad-jax demo                # uses this config
  deepcad-jax train --config demo --data sim/noisy.tif --workdir runs/demo
"""

from deepcad_jax.config import (Config, DataConfig, InferConfig, ModelConfig,
                                TrainConfig)

# The demo's simulated recordings (T, Y, X) and their noise level (`deepcad-jax demo`,
# the napari plugin's sample data).
SIMULATIONS = {"full": dict(shape=(300, 64, 64), snr_db=-2.0),
               "quick": dict(shape=(48, 32, 32), snr_db=-2.0)}


def get_config(arg=None) -> Config:
  quick = arg == "quick"
  return Config(
      name="demo:quick" if quick else "demo",
      model=ModelConfig(features=4 if quick else 8),
      data=DataConfig(patch=(8, 16, 16) if quick else (16, 32, 32),
                      pairs_per_epoch=16 if quick else 100, workers=0),
      train=TrainConfig(epochs=2 if quick else 40, lr=1e-3, log_every=10,
                        lr_schedule="constant" if quick else "cosine"),
      infer=InferConfig(overlap=0.25))
