"""DeepCAD-RT (f=16, 1,020,337 parameters), the reference's training recipe.

The reference trains on 150^3 patches; configs keep every pooling exact, so the patch is
144^3 (the nearest multiple of 8). Inference uses overlap 0.4, as in the paper's timing.

  deepcad-jax train --config deepcad_rt --data DATA_DIR --workdir runs/rt
"""

from deepcad_jax.config import Config, DataConfig, ModelConfig


def get_config(arg=None) -> Config:
  del arg
  return Config(name="deepcad_rt", model=ModelConfig(features=16),
                data=DataConfig(patch=(144, 144, 144)))
