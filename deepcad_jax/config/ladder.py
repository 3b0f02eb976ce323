"""One rung of the paper's pruning ladder: f in {64, 48, 32, 24, 16, 12, 8}.

The argument is the width; otherwise the DeepCAD-RT recipe.

  deepcad-jax train --config ladder:32 --data DATA_DIR --workdir runs/f32
"""

from deepcad_jax.config import Config, DataConfig, ModelConfig
from deepcad_jax.errors import UserError
from deepcad_jax.core.network import LADDER


def get_config(arg=None) -> Config:
  if arg is None or not str(arg).isdigit() or int(arg) not in LADDER:
    raise UserError(f"ladder needs a width from {LADDER}, e.g. --config ladder:32; "
                    f"got {arg!r}.")
  f = int(arg)
  return Config(name=f"ladder:{f}", model=ModelConfig(features=f),
                data=DataConfig(patch=(144, 144, 144)))
