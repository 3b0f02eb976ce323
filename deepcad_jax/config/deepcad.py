"""The original DeepCAD (f=64, 16,315,585 parameters), the top of the pruning ladder.

  deepcad-jax train --config deepcad --data DATA_DIR --workdir runs/deepcad
"""

from deepcad_jax.config import Config, DataConfig, ModelConfig


def get_config(arg=None) -> Config:
  del arg
  return Config(name="deepcad", model=ModelConfig(features=64),
                data=DataConfig(patch=(144, 144, 144)))
