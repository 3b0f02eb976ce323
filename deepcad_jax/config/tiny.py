"""A tiny network and patch for tests and laptop CPUs (seconds per epoch).

  deepcad-jax train --config tiny --data DATA_DIR --workdir runs/tiny
"""

from deepcad_jax.config import (Config, DataConfig, InferConfig, ModelConfig,
                                TrainConfig)


def get_config(arg=None) -> Config:
  del arg
  return Config(
      name="tiny",
      model=ModelConfig(features=4),
      data=DataConfig(patch=(8, 16, 16), pairs_per_epoch=16, workers=0),
      train=TrainConfig(epochs=2, lr=1e-3, log_every=1),
      infer=InferConfig(overlap=0.25))
