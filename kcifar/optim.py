"""Optimizers, weight decay and learning-rate schedules from a recipe.

Schedules are Keras ``LearningRateSchedule`` objects evaluated per step, so a
resumed run (BackupAndRestore restores ``optimizer.iterations``) continues at
the right point. Epoch-based PyTorch parameters (``step_size``, ``milestones``,
``t_max``) are converted with the number of steps per epoch.

Weight decay comes in two modes:
- ``l2``: PyTorch's coupled decay, ``Adam(weight_decay=wd)`` / ``SGD(weight_decay=wd)``,
  which adds ``wd * w`` to every gradient before the update (the documented S2
  and S4 recipes used it);
- ``decoupled``: Keras' / AdamW's ``w -= lr * wd * w`` after the update.
``adamw`` is always decoupled. Both apply to every trainable variable, as PyTorch does.

Weight averaging is Keras' own ``use_ema`` (``ema_momentum``, ``ema_overwrite_frequency``:
every that many steps the weights are set to their average, a lookahead), with one extra:
``ema_ramp_power`` p > 0 ramps the momentum up as ``ema_momentum * (step / total_steps) ** p``,
so early training, which moves fast, is barely averaged (airbench94's lookahead schedule).
"""

import math

import keras
from keras import ops

from kcifar.errors import KcifarError


class _CoupledWeightDecay:
    """Mixin: adds ``l2_decay * w`` to each gradient, as PyTorch's ``weight_decay``."""

    def __init__(self, *args, l2_decay=0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.l2_decay = l2_decay

    def apply(self, grads, trainable_variables=None):
        if not self.l2_decay:
            return super().apply(grads, trainable_variables)
        variables = self._trainable_variables if trainable_variables is None else list(trainable_variables)
        grads = [g if g is None else g + self.l2_decay * ops.cast(v, g.dtype) for g, v in zip(grads, variables)]
        return super().apply(grads, trainable_variables)

    def get_config(self):
        return {**super().get_config(), "l2_decay": self.l2_decay}


class _RampedEma:
    """Mixin: Keras' EMA of the weights with its momentum ramped up over ``ema_ramp_steps``
    (``ema_momentum * min(step / ema_ramp_steps, 1) ** ema_ramp_power``); Keras' own update
    runs with that momentum in place of the constant one."""

    def __init__(self, *args, ema_ramp_steps=0, ema_ramp_power=0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.ema_ramp_steps, self.ema_ramp_power = int(ema_ramp_steps), float(ema_ramp_power)

    def _update_model_variables_moving_average(self, trainable_variables):
        if not (self.use_ema and self.ema_ramp_power):
            return super()._update_model_variables_moving_average(trainable_variables)
        full = self.ema_momentum
        progress = ops.minimum(ops.cast(self.iterations, "float32") / max(self.ema_ramp_steps, 1), 1.0)
        self.ema_momentum = full * progress**self.ema_ramp_power  # read once by Keras' update below
        try:
            super()._update_model_variables_moving_average(trainable_variables)
        finally:
            self.ema_momentum = full

    def finalize_variable_values(self, var_list):
        """At the end of ``fit``: the weights become their average. Keras pairs ``var_list`` (the
        model's trainable weights now) with the averages of the variables it was built with;
        a layer frozen since (``FreezeWhiteningBias``) would shift that pairing, so use those."""
        super().finalize_variable_values(self._trainable_variables)

    def get_config(self):
        return {**super().get_config(), "ema_ramp_steps": self.ema_ramp_steps, "ema_ramp_power": self.ema_ramp_power}


# Keras' optimizers with kcifar's extras: PyTorch-style L2 and the EMA ramp.
@keras.saving.register_keras_serializable(package="kcifar")
class SGDL2(_CoupledWeightDecay, _RampedEma, keras.optimizers.SGD):
    pass


@keras.saving.register_keras_serializable(package="kcifar")
class AdamL2(_CoupledWeightDecay, _RampedEma, keras.optimizers.Adam):
    pass


@keras.saving.register_keras_serializable(package="kcifar")
class RMSpropL2(_CoupledWeightDecay, _RampedEma, keras.optimizers.RMSprop):
    pass


def make_optimizer(spec: dict, learning_rate, total_steps=0):
    """A Keras optimizer from the recipe's ``[optimizer]`` table (``total_steps``: the run's, for
    the EMA ramp)."""
    name, decay = spec["name"], spec["weight_decay"]
    coupled = decay > 0 and spec["weight_decay_mode"] == "l2" and name != "adamw"
    kwargs = {"learning_rate": learning_rate}
    if decay > 0 and not coupled:
        kwargs["weight_decay"] = decay
    if coupled:
        kwargs["l2_decay"] = decay
    if spec["ema_momentum"] > 0:  # the kcifar classes carry the EMA's ramp
        if name == "adamw":
            raise KcifarError("optimizer.ema_momentum needs sgd, adam or rmsprop (adam with "
                              "weight_decay_mode='decoupled' is AdamW's update)")
        kwargs.update(use_ema=True, ema_momentum=spec["ema_momentum"],
                      ema_overwrite_frequency=spec["ema_overwrite_frequency"] or None, ema_ramp_steps=total_steps,
                      ema_ramp_power=spec["ema_ramp_power"], l2_decay=decay if coupled else 0.0)
        coupled = True
    adam_args = {"beta_1": spec["beta_1"], "beta_2": spec["beta_2"], "epsilon": spec["epsilon"], "amsgrad": spec["amsgrad"]}
    if name == "sgd":
        return (SGDL2 if coupled else keras.optimizers.SGD)(momentum=spec["momentum"], nesterov=spec["nesterov"], **kwargs)
    if name == "adam":
        return (AdamL2 if coupled else keras.optimizers.Adam)(**adam_args, **kwargs)
    if name == "adamw":
        kwargs.setdefault("weight_decay", 0.0)
        return keras.optimizers.AdamW(**adam_args, **kwargs)
    if name == "rmsprop":
        return (RMSpropL2 if coupled else keras.optimizers.RMSprop)(**kwargs)
    raise KcifarError(f"unknown optimizer '{name}'; choose one of: sgd, adam, adamw, rmsprop")


@keras.saving.register_keras_serializable(package="kcifar")
class OneCycle(keras.optimizers.schedules.LearningRateSchedule):
    """PyTorch's OneCycleLR (two phases, cosine annealing): from ``max_lr / div_factor``
    up to ``max_lr`` over ``pct_start`` of the steps, then down to
    ``max_lr / div_factor / final_div_factor``. ``anneal="linear"``: straight lines (a triangle)."""

    def __init__(self, max_lr, total_steps, pct_start=0.3, div_factor=25.0, final_div_factor=1e4, anneal="cos"):
        self.max_lr, self.total_steps = float(max_lr), int(total_steps)
        self.pct_start, self.div_factor, self.final_div_factor = pct_start, div_factor, final_div_factor
        self.anneal = anneal

    def __call__(self, step):
        step = ops.cast(step, "float32")
        up_steps = max(self.pct_start * self.total_steps, 1.0)
        down_steps = max(self.total_steps - up_steps, 1.0)
        start = self.max_lr / self.div_factor
        end = start / self.final_div_factor

        def anneal(a, b, t):
            if self.anneal == "linear":
                return a + (b - a) * t
            return b + (a - b) * (1 + ops.cos(math.pi * t)) / 2

        rising = anneal(start, self.max_lr, ops.minimum(step / up_steps, 1.0))
        falling = anneal(self.max_lr, end, ops.clip((step - up_steps) / down_steps, 0.0, 1.0))
        return ops.where(step < up_steps, rising, falling)

    def get_config(self):
        return {"max_lr": self.max_lr, "total_steps": self.total_steps, "pct_start": self.pct_start,
                "div_factor": self.div_factor, "final_div_factor": self.final_div_factor, "anneal": self.anneal}


def make_schedule(spec: dict, learning_rate: float, epochs: int, steps_per_epoch: int):
    """The learning rate (a float or a Keras schedule) for the recipe's ``[schedule]`` table.

    ``plateau`` returns the constant rate; its ReduceLROnPlateau callback comes
    from ``plateau_callback``.
    """
    name, schedules = spec["name"], keras.optimizers.schedules
    t_max = (spec["t_max"] or epochs) * steps_per_epoch
    alpha = spec["eta_min"] / learning_rate
    if name in ("constant", "plateau"):
        return learning_rate
    if name in ("step", "exponential"):
        every = spec["step_size"] if name == "step" else 1
        return schedules.ExponentialDecay(learning_rate, every * steps_per_epoch, spec["gamma"], staircase=True)
    if name == "multistep":
        if not spec["milestones"]:
            raise KcifarError("schedule 'multistep' needs schedule.milestones, e.g. [30, 60, 90] (epochs)")
        boundaries = [int(m) * steps_per_epoch for m in spec["milestones"]]
        return schedules.PiecewiseConstantDecay(boundaries, [learning_rate * spec["gamma"] ** i for i in range(len(boundaries) + 1)])
    if name == "cosine":
        return schedules.CosineDecay(learning_rate, t_max, alpha=alpha)
    if name == "warmup_cosine":
        warmup = spec["warmup_epochs"] * steps_per_epoch
        return schedules.CosineDecay(0.0, max(t_max - warmup, 1), alpha=alpha,
                                     warmup_target=learning_rate, warmup_steps=warmup)
    if name in ("onecycle", "triangular"):
        return OneCycle(learning_rate, epochs * steps_per_epoch, spec["pct_start"], spec["div_factor"],
                        spec["final_div_factor"], anneal="cos" if name == "onecycle" else "linear")
    raise KcifarError(f"unknown schedule '{name}'")


def plateau_callback(spec: dict, monitor: str):
    """ReduceLROnPlateau for the ``plateau`` schedule, else None."""
    if spec["name"] != "plateau":
        return None
    return keras.callbacks.ReduceLROnPlateau(monitor=monitor, factor=spec["factor"],
                                             patience=spec["patience"], min_lr=spec["min_lr"])
