"""The README's Extend table, row by row, done as it says: a new activation or norm layer
is one registry entry, and then a config can name it, it changes the output, and the
CPU kernels (both layouts) and the library ops compute the same; a per-block option is
a shapes.Block field and its use. (Pools: test_shapes.)"""

import dataclasses
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import REPO
from convnet import config_lib, models, shapes, train
from convnet import ops as ops_lib
from references import ALL_OPS, OPS_IDS


class RMSNorm(models.nn.Module):
  """An RMS norm over the channels at each position, with a per-channel scale."""
  channels: int
  channel_axis: int

  @models.nn.compact
  def __call__(self, x):
    scale = self.param('scale', models.nn.initializers.ones, (self.channels,))
    shape = [1] * x.ndim
    shape[self.channel_axis] = self.channels
    y = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), self.channel_axis, keepdims=True) + 1e-6)
    return y * scale.reshape(shape)


ROWS = {  # README row -> (registry, name, entry, config change)
    'an activation': (models.ACTIVATIONS, 'softsign',
                      models.Activation(jax.nn.soft_sign, nondecreasing=True),
                      lambda config: setattr(config.model, 'activation', 'softsign')),
    'a norm layer': (models.NORMS, 'rms',
                     lambda site: RMSNorm(channels=site.channels, channel_axis=site.channel_axis),
                     lambda config: setattr(config.model, 'norm', ('rms',))),
}


@pytest.mark.parametrize('row', ROWS)
def test_an_extend_row_done_as_the_readme_says_works_on_every_backend(smoke_config, monkeypatch,
                                                                     row):
  registry, name, entry, change = ROWS[row]
  config = smoke_config
  config.model.update(num_blocks=2, filters=(4, 8), hidden=(16,), dropout=0.0)
  x = jax.random.normal(jax.random.key(1), (4, 28, 28, 1))

  def logits(config, ops_):
    config.model.ops, config.model.layout = ops_.backend, ops_.layout
    model = train.build_model(config_lib.validate(config, 2).model, axis_name=None)
    return model.apply(model.init(jax.random.key(0), x), x)

  before = logits(config, ALL_OPS[0])
  change(config)
  with pytest.raises(config_lib.ConfigError, match='must be one of'):
    config_lib.validate(config, 2)  # Not yet registered.
  monkeypatch.setitem(registry, name, entry)  # The one edit the README names.
  outputs = {ops_id: logits(config, ops_) for ops_, ops_id in zip(ALL_OPS, OPS_IDS)}
  assert not np.allclose(outputs['xla'], before, atol=1e-3)  # It changed the model.
  for ops_id, output in outputs.items():
    np.testing.assert_allclose(output, outputs['xla'], rtol=1e-4, atol=1e-5, err_msg=ops_id)


PER_BLOCK_OPTION = '''
import dataclasses, jax, numpy as np
from convnet import models, shapes

@dataclasses.dataclass(frozen=True)
class Block(shapes.Block):  # The README's row: the field (with its default) ...
  gain: int = 1  # Multiplies the block's output.

class ConvBlock(models.ConvBlock):  # ... and its use. Nothing else is edited.
  def __call__(self, x, train=False):
    return super().__call__(x, train) * self.spec.gain

# As if the field were written into convnet/shapes.py and its use into convnet/models.py.
shapes.Block, models.ConvBlock = Block, ConvBlock
from configs import default
from convnet import config_lib, train

config = default.get_config('smoke')
assert config.model.gain == (1,)  # A config key at once, at its default.
config.model.update(num_blocks=2, filters=(4, 8), gain=(2, 3), ops='xla')
x = jax.random.normal(jax.random.key(1), (2, 28, 28, 1))
model = train.build_model(config_lib.validate(config, 1).model, axis_name=None)
assert [b.gain for b in model.blocks] == [2, 3]
variables = model.init(jax.random.key(0), x)
config.model.ops = 'cpu'  # The CPU conv does not know gain: the library conv, said once.
cpu = train.build_model(config_lib.validate(config, 1).model, axis_name=None)
np.testing.assert_allclose(cpu.apply(variables, x), model.apply(variables, x), rtol=1e-4,
                           atol=1e-5)
config.model.update(gain=(1,), ops='xla')
plain = train.build_model(config_lib.validate(config, 1).model, axis_name=None)
assert not np.allclose(model.apply(variables, x), plain.apply(variables, x), atol=1e-3)
block = {'params': variables['params']['ConvBlock_0']}
np.testing.assert_allclose(ConvBlock(model.blocks[0]).apply(block, x),
                           2 * ConvBlock(plain.blocks[0]).apply(block, x), rtol=1e-5, atol=1e-6)
config.model.gain = (0,)
try:
  config_lib.validate(config, 1)
except config_lib.ConfigError as e:
  print('refused:', e)
'''


def test_a_per_block_option_is_a_field_and_its_use(tmp_path):
  """A new shapes.Block field with a default is a per-block config key at once (in
  configs/default.py, validated, passed to each block): two edits, done here in
  subclasses in a fresh interpreter. The CPU conv, written before the field, hands such a
  block to the library conv and says so once."""
  script = tmp_path / 'option.py'
  script.write_text(PER_BLOCK_OPTION)
  done = subprocess.run([sys.executable, str(script)], cwd=REPO, capture_output=True, text=True,
                        timeout=120, env={**os.environ, 'PYTHONPATH': REPO})
  assert done.returncode == 0, done.stderr
  assert done.stdout.strip() == 'refused: model.gain must be > 0, got (0,)'
  assert done.stderr.count('note: model.gain=2: the CPU conv kernel does not handle it') == 1


@dataclasses.dataclass(frozen=True)
class ShiftedBlock(shapes.Block):
  taps_shift: int = 1  # As if a new conv option: only the library conv would be taught it.


def test_the_cpu_kernels_decline_a_block_with_a_field_they_do_not_know(monkeypatch):
  """The CPU conv, its pools and the one-matmul conv + max pool (CHWN) know the fields in
  ops.CPU_CONV_HANDLES, CPU_POOL_HANDLES and FUSED_HANDLES; a block that sets any other
  (here a new one) runs the library ops, never a kernel that would skip it."""
  cpu = ops_lib.Ops('cpu', 'CHWN')
  plain = ShiftedBlock(filters=4, kernel_size=3, pool='max', pool_size=2, pool_stride=2)
  shifted = dataclasses.replace(plain, taps_shift=2)
  assert cpu.pools_with_conv(plain, in_channels=1, commutes=True)
  assert not cpu.pools_with_conv(shifted, in_channels=1, commutes=True)
  assert not cpu.pools_with_conv(dataclasses.replace(plain, dilation=2), 1, commutes=True)
  assert plain.unhandled(ops_lib.CPU_CONV_HANDLES) is None
  assert shifted.unhandled(ops_lib.CPU_CONV_HANDLES) == 'taps_shift=2'
  x = jax.random.normal(jax.random.key(0), (1, 9, 9, 2))  # CHWN
  kernel = jax.random.normal(jax.random.key(1), (3, 3, 1, 4))
  library = ops_lib.Ops().conv2d(cpu.to_nhwc(x), kernel, plain)
  monkeypatch.setattr(ops_lib.cpu_conv, 'conv2d', lambda *args, **kwargs: 1 / 0)
  monkeypatch.setitem(ops_lib.CPU_POOLS, 'max', lambda *args, **kwargs: 1 / 0)
  np.testing.assert_allclose(cpu.to_nhwc(cpu.conv2d(x, kernel, shifted)), library, rtol=1e-6)
  np.testing.assert_array_equal(cpu.pool2d(x, shifted), shapes.POOLS['max'].apply(x, 2, 2))