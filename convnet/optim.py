"""Learning-rate schedules and optimizers: registries that config validation offers.

A new schedule or optimizer is one entry here; configs can then name it. Each entry
reads what it needs from the run's config_lib.Spec (whose fields are the config keys).
"""

import optax

# name -> (spec, decay_steps) -> schedule over the steps after the warmup.
SCHEDULES = {
    'constant': lambda spec, decay_steps: optax.constant_schedule(spec.learning_rate),
    'cosine': lambda spec, decay_steps: optax.cosine_decay_schedule(spec.learning_rate,
                                                                      max(decay_steps, 1)),
}

# name -> (spec, learning-rate schedule) -> optax transformation.
OPTIMIZERS = {
    'adam': lambda spec, learning_rate: optax.adam(learning_rate),
    'adamw': lambda spec, learning_rate: optax.adamw(learning_rate,
                                                       weight_decay=spec.weight_decay),
    'sgd': lambda spec, learning_rate: optax.sgd(learning_rate,
                                                   momentum=spec.momentum or None),
}


def create_learning_rate_fn(spec, steps_per_epoch: int) -> optax.Schedule:
  """spec.schedule over the run, after a linear warmup from 0 if warmup_epochs > 0."""
  warmup_steps = int(spec.warmup_epochs * steps_per_epoch)
  total_steps = spec.num_epochs * steps_per_epoch
  main = SCHEDULES[spec.schedule](spec, total_steps - warmup_steps)
  if warmup_steps == 0:
    return main
  warmup = optax.linear_schedule(0.0, spec.learning_rate, warmup_steps)
  return optax.join_schedules([warmup, main], [warmup_steps])


def create_optimizer(spec, learning_rate_fn: optax.Schedule) -> optax.GradientTransformation:
  return OPTIMIZERS[spec.optimizer](spec, learning_rate_fn)
