"""A trained run loaded from its workdir alone, for visualize, predict and notebooks.

Read-only: it creates, moves and rewrites nothing in the workdir.

It is built by the same `train.init_run` as training, so it runs the same model with
the same kernels; the workdir's data.json gives the image shape and normalisation, so
the training set is never read.
"""

import os

import jax.numpy as jnp
import numpy as np

from convnet import checkpoint, config_lib, input_pipeline, models, train
from convnet import workdir as workdir_lib


class Trained:
  """A finished or checkpointed run, from its workdir alone: its config (`spec`), model
  (one device), variables (seed 0) and the normalisation its training data had
  (data.json)."""

  def __init__(self, workdir: str):
    self.spec = config_lib.read(workdir_lib.config_from_dict(
        read_record(workdir, 'config.json'), os.path.join(workdir, 'config.json')))
    self.data = read_record(workdir, 'data.json')
    image_shape = tuple(self.data['image_shape'])
    run = train.init_run(self.spec, image_shape, steps_per_epoch=1, axis_name=None)
    self.model = run.model  # The kernels training used here: the same forward pass.
    with checkpoint.manager(workdir, self.spec.keep_checkpoints, read_only=True) as checkpoints:
      restored = train.restore_checkpoint(checkpoints, run.state,
                                          (run.data_keys, run.dropout_keys), read_only=True)
    if restored is None:
      raise checkpoint.CheckpointError(f'{workdir}/checkpoints holds no checkpoint')
    state, _, _, self.step = restored
    self.variables = train.first_seed({'params': state.params,
                                       'batch_stats': state.batch_stats})

  def normalize(self, images: np.ndarray):
    return input_pipeline.normalize(jnp.asarray(images), self.data['mean'], self.data['std'])

  def apply(self, images: np.ndarray):
    """Logits for uint8 [n, h, w, c] images, as the trained model computes them."""
    return self.model.apply(self.variables, self.normalize(images))

  def feature_maps(self, images: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """[(name, [n, h, w, c])] after each block's conv and pooling (models.feature_maps)."""
    return [(name, np.asarray(fmap)) for name, fmap in
            models.feature_maps(self.model, self.variables, self.normalize(images))]

def read_record(workdir: str, name: str) -> dict:
  """A run's JSON record, or FileNotFoundError naming it."""
  path = os.path.join(workdir, name)
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} not found: {workdir} holds no run (or one from before '
                            f'{name} was written)')
  return workdir_lib.read_json(path)
