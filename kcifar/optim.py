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

``sgd_muon`` is SGD in which the convolution kernels (the 4-D trainable variables) take Muon's
step instead (Jordan 2024, airbench94_muon's split): momentum of the raw gradient, orthogonalised
by a Newton-Schulz iteration, at ``muon_learning_rate``, which follows the schedule's shape.

Without XLA (kcifar's default on a CPU), Adam and AdamW update each variable with TensorFlow's
fused training kernel (one op, Keras' formulas) instead of Keras' element-wise ops, each a pass
over the variable of its own; SGD keeps Keras' update, its fused kernel having been no faster
(measured: experiments/results/speed_epyc_avx512bf16_fused_ab*.md).
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
        grads = [g if g is None or not self._decays(v) else g + self.l2_decay * ops.cast(v, g.dtype)
                 for g, v in zip(grads, variables)]
        return super().apply(grads, trainable_variables)

    def _decays(self, variable) -> bool:
        return True

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


class _FusedAdam:
    """Mixin: ``fused=True`` runs each dense update of Adam (AMSGrad) as TensorFlow's fused
    training kernel ``ResourceApplyAdam`` (``ResourceApplyAdamWithAmsgrad``): Keras' formulas in one
    pass over the variable instead of Keras' eight to ten element-wise ops, each a pass of its own.
    The kernels have no XLA version (``jit_compile`` refuses them): ``run.compile_model`` asks for
    them only where training runs without XLA."""

    def __init__(self, *args, fused=False, **kwargs):
        super().__init__(*args, **kwargs)
        self.fused = bool(fused)

    def update_step(self, gradient, variable, learning_rate):
        if self.fused and self._fusable(gradient, variable):
            self._fused_step(gradient, variable, learning_rate)
        else:
            super().update_step(gradient, variable, learning_rate)

    @staticmethod
    def _fusable(gradient, variable) -> bool:
        if keras.backend.backend() != "tensorflow" or not hasattr(variable, "handle"):
            return False
        import tensorflow as tf

        return not isinstance(gradient, tf.IndexedSlices)

    def _fused_step(self, gradient, variable, learning_rate):
        import tensorflow as tf

        dtype, i = variable.dtype, self._get_variable_index(variable)
        step = tf.cast(self.iterations + 1, dtype)
        beta_1, beta_2 = tf.cast(self.beta_1, dtype), tf.cast(self.beta_2, dtype)
        args = {"var": variable.handle, "m": self._momentums[i].value.handle, "v": self._velocities[i].value.handle,
                "beta1_power": tf.pow(beta_1, step), "beta2_power": tf.pow(beta_2, step),
                "lr": tf.cast(learning_rate, dtype), "beta1": beta_1, "beta2": beta_2,
                "epsilon": tf.cast(self.epsilon, dtype), "grad": tf.cast(gradient, dtype)}
        if self.amsgrad:
            tf.raw_ops.ResourceApplyAdamWithAmsgrad(vhat=self._velocity_hats[i].value.handle, **args)
        else:
            tf.raw_ops.ResourceApplyAdam(**args)

    def get_config(self):
        return {**super().get_config(), "fused": self.fused}


# Keras' optimizers with kcifar's extras: PyTorch-style L2, the EMA ramp and (Adam) TensorFlow's fused update.
@keras.saving.register_keras_serializable(package="kcifar")
class SGDL2(_CoupledWeightDecay, _RampedEma, keras.optimizers.SGD):
    pass


def orthogonalize(matrix, steps=3):
    """Newton-Schulz's quintic iteration towards the nearest semi-orthogonal matrix (Muon's): its
    singular values land near 1 (within ~0.5-1.5 after 3 steps, as intended), its singular vectors
    are the input's. Computed in float32 on the smaller Gram matrix."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = ops.cast(matrix, "float32")
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = ops.transpose(x)
    x = x / (ops.sqrt(ops.sum(ops.square(x))) + 1e-7)  # every singular value <= 1
    for _ in range(steps):
        gram = ops.matmul(x, ops.transpose(x))
        x = a * x + ops.matmul(b * gram + c * ops.matmul(gram, gram), x)
    return ops.transpose(x) if tall else x


@keras.saving.register_keras_serializable(package="kcifar")
class SGDMuon(SGDL2):
    """SGD whose convolution kernels (4-D variables) take Muon's step: ``m = muon_momentum * m + g``
    (Nesterov: ``g + muon_momentum * m``), the kernel rescaled to norm sqrt(filters) (BatchNorm
    follows each convolution, so only its direction matters), then moved by
    ``learning_rate * muon_lr_ratio`` times the orthogonalised step, the kernel flattened to
    (kh * kw * in, filters). Everything else, and the L2 decay (kernels excepted), is SGD."""

    def __init__(self, *args, muon_lr_ratio=1.0, muon_momentum=0.6, **kwargs):
        super().__init__(*args, **kwargs)
        self.muon_lr_ratio, self.muon_momentum = float(muon_lr_ratio), float(muon_momentum)

    def _decays(self, variable) -> bool:
        return not self._is_kernel(variable)

    @staticmethod
    def _is_kernel(variable) -> bool:
        return len(variable.shape) == 4

    def build(self, variables):
        if self.built:
            return
        super().build(variables)
        self.muon_momentums = [self.add_variable_from_reference(v, "muon_momentum") if self._is_kernel(v) else None
                               for v in variables]

    def update_step(self, gradient, variable, learning_rate):
        if not self._is_kernel(variable):
            return super().update_step(gradient, variable, learning_rate)
        gradient = ops.cast(gradient, variable.dtype)
        m = self.muon_momentums[self._get_variable_index(variable)]
        self.assign(m, self.muon_momentum * m + gradient)
        step = gradient + self.muon_momentum * m if self.nesterov else m
        filters = variable.shape[-1]
        update = ops.reshape(orthogonalize(ops.reshape(step, (-1, filters))), variable.shape)
        norm = ops.sqrt(ops.sum(ops.square(variable)))
        rate = ops.cast(learning_rate, variable.dtype) * self.muon_lr_ratio
        self.assign(variable, variable * (filters**0.5 / norm) - rate * ops.cast(update, variable.dtype))

    def get_config(self):
        return {**super().get_config(), "muon_lr_ratio": self.muon_lr_ratio, "muon_momentum": self.muon_momentum}


@keras.saving.register_keras_serializable(package="kcifar")
class AdamL2(_CoupledWeightDecay, _RampedEma, _FusedAdam, keras.optimizers.Adam):
    pass


@keras.saving.register_keras_serializable(package="kcifar")
class AdamW(_FusedAdam, keras.optimizers.AdamW):
    pass


@keras.saving.register_keras_serializable(package="kcifar")
class RMSpropL2(_CoupledWeightDecay, _RampedEma, keras.optimizers.RMSprop):
    pass


def make_optimizer(spec: dict, learning_rate, total_steps=0, fused=False):
    """A Keras optimizer from the recipe's ``[optimizer]`` table (``total_steps``: the run's, for
    the EMA ramp; ``fused``: TensorFlow's fused update kernels for Adam and AdamW, for training
    without XLA)."""
    name, decay = spec["name"], spec["weight_decay"]
    coupled = decay > 0 and spec["weight_decay_mode"] == "l2" and name != "adamw"
    kwargs = {"learning_rate": learning_rate}
    if name != "adamw":  # the kcifar classes below carry PyTorch's L2 and the EMA's ramp
        kwargs["l2_decay"] = decay if coupled else 0.0
    if decay > 0 and not coupled:
        kwargs["weight_decay"] = decay
    if spec["ema_momentum"] > 0:
        if name == "adamw":
            raise KcifarError("optimizer.ema_momentum needs sgd, sgd_muon, adam or rmsprop (adam with "
                              "weight_decay_mode='decoupled' is AdamW's update)")
        kwargs.update(use_ema=True, ema_momentum=spec["ema_momentum"],
                      ema_overwrite_frequency=spec["ema_overwrite_frequency"] or None, ema_ramp_steps=total_steps,
                      ema_ramp_power=spec["ema_ramp_power"])
    adam_args = {"beta_1": spec["beta_1"], "beta_2": spec["beta_2"], "epsilon": spec["epsilon"], "amsgrad": spec["amsgrad"]}
    if name == "sgd":
        return SGDL2(momentum=spec["momentum"], nesterov=spec["nesterov"], **kwargs)
    if name == "sgd_muon":
        return SGDMuon(momentum=spec["momentum"], nesterov=spec["nesterov"], muon_momentum=spec["muon_momentum"],
                       muon_lr_ratio=spec["muon_learning_rate"] / spec["learning_rate"], **kwargs)
    if name == "adam":
        return AdamL2(**adam_args, fused=fused, **kwargs)
    if name == "adamw":
        return AdamW(**adam_args, fused=fused, **{"weight_decay": 0.0, **kwargs})
    if name == "rmsprop":
        return RMSpropL2(rho=spec["rho"], epsilon=spec["epsilon"], **kwargs)
    raise KcifarError(f"unknown optimizer '{name}'; choose one of: sgd, sgd_muon, adam, adamw, rmsprop")


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


@keras.saving.register_keras_serializable(package="kcifar")
class PerEpoch(keras.optimizers.schedules.LearningRateSchedule):
    """``schedule`` held through each epoch at its value at the epoch's first step: a PyTorch
    scheduler stepped once per epoch (``scheduler.step()`` after each epoch, as the write-ups do)."""

    def __init__(self, schedule, steps_per_epoch):
        self.schedule, self.steps_per_epoch = schedule, int(steps_per_epoch)

    def __call__(self, step):
        return self.schedule(ops.floor_divide(step, self.steps_per_epoch) * self.steps_per_epoch)

    def get_config(self):
        return {"schedule": keras.optimizers.schedules.serialize(self.schedule),
                "steps_per_epoch": self.steps_per_epoch}

    @classmethod
    def from_config(cls, config):
        return cls(keras.optimizers.schedules.deserialize(config["schedule"]), config["steps_per_epoch"])


def make_schedule(spec: dict, learning_rate: float, epochs: int, steps_per_epoch: int):
    """The learning rate (a float or a Keras schedule) for the recipe's ``[schedule]`` table,
    changing at every step, or once per epoch with ``per_epoch``.

    ``plateau`` returns the constant rate; its ReduceLROnPlateau callback comes
    from ``plateau_callback``.
    """
    schedule = _schedule(spec, learning_rate, epochs, steps_per_epoch)
    if spec["per_epoch"] and isinstance(schedule, keras.optimizers.schedules.LearningRateSchedule):
        return PerEpoch(schedule, steps_per_epoch)
    return schedule


def _schedule(spec: dict, learning_rate: float, epochs: int, steps_per_epoch: int):
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
