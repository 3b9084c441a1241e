import keras
import numpy as np
import pytest

from kcifar import optim
from kcifar.recipe import DEFAULTS

W = np.array([0.5, -1.0, 2.0], dtype=np.float32)
G = np.array([0.1, 0.2, -0.3], dtype=np.float32)


def one_step(optimizer):
    variable = keras.Variable(W.copy())
    optimizer.apply([keras.ops.convert_to_tensor(G)], [variable])
    return keras.ops.convert_to_numpy(variable)


def spec(**changes):
    return {**DEFAULTS["optimizer"], **changes}


def test_l2_decay_matches_pytorch_adam_by_hand():
    lr, wd, b1, b2, eps = 0.01, 0.1, 0.9, 0.999, 1e-8
    g = G + wd * W  # PyTorch: weight_decay adds wd * w to the gradient
    m, v = (1 - b1) * g, (1 - b2) * g * g
    expected = W - lr * (m / (1 - b1)) / (np.sqrt(v / (1 - b2)) + eps)
    adam = optim.make_optimizer(spec(name="adam", amsgrad=False, weight_decay=wd, epsilon=eps), lr)
    np.testing.assert_allclose(one_step(adam), expected, atol=1e-6)


def test_l2_decay_matches_pytorch_sgd_by_hand():
    sgd = optim.make_optimizer(spec(name="sgd", momentum=0.9, weight_decay=0.1), 0.5)
    np.testing.assert_allclose(one_step(sgd), W - 0.5 * (G + 0.1 * W), rtol=1e-6)


def test_decoupled_decay_shrinks_weights_outside_the_gradient():
    sgd = optim.make_optimizer(spec(name="sgd", momentum=0.0, weight_decay=0.1, weight_decay_mode="decoupled"), 0.5)
    np.testing.assert_allclose(one_step(sgd), W - 0.5 * 0.1 * W - 0.5 * G, rtol=1e-6)
    assert sgd.l2_decay == 0


def test_no_decay_adds_no_l2_and_adamw_decays_decoupled():
    assert optim.make_optimizer(spec(name="adam"), 0.1).l2_decay == 0
    adamw = optim.make_optimizer(spec(name="adamw", weight_decay=0.05), 0.1)
    assert isinstance(adamw, keras.optimizers.AdamW) and adamw.weight_decay == 0.05


FUSED_CASES = {  # optimizer spec -> TensorFlow's fused kernel it must run
    "adam": ({"name": "adam", "amsgrad": False}, "ResourceApplyAdam"),
    "amsgrad, l2": ({"name": "adam", "amsgrad": True, "weight_decay": 0.1}, "ResourceApplyAdamWithAmsgrad"),
    "adamw": ({"name": "adamw", "amsgrad": False, "weight_decay": 0.1}, "ResourceApplyAdam"),
    "adam, ema": ({"name": "adam", "amsgrad": False, "ema_momentum": 0.5}, "ResourceApplyAdam"),
}


def op_types(function) -> set:
    """The types of every op of a traced function, those of its nested functions included."""
    graph = function.graph.as_graph_def()
    return {node.op for node in graph.node} | {node.op for f in graph.library.function for node in f.node_def}


@pytest.mark.parametrize("case", FUSED_CASES)
def test_fused_update_is_keras_update_in_one_kernel(case):
    import tensorflow as tf

    changes, kernel = FUSED_CASES[case]
    rng = np.random.default_rng(0)
    weights = [rng.normal(size=(3, 3, 4, 8)).astype("float32"), rng.normal(size=8).astype("float32")]
    grads = [[rng.normal(size=w.shape).astype("float32") for w in weights] for _ in range(4)]
    results, ops_run = [], []
    for fused in (False, True):
        optimizer = optim.make_optimizer(spec(**changes), 0.05, total_steps=4, fused=fused)
        variables = [keras.Variable(w) for w in weights]
        step = tf.function(lambda g: optimizer.apply(g, variables))
        for g in grads:
            step([tf.constant(x) for x in g])
        results.append([v.numpy() for v in variables])
        ops_run.append(op_types(step.get_concrete_function([tf.constant(x) for x in grads[0]])))
    for keras_weights, fused_weights in zip(*results):
        np.testing.assert_allclose(fused_weights, keras_weights, atol=1e-5)  # float32 rounding: steps are ~0.05
    assert kernel not in ops_run[0] and kernel in ops_run[1]


def lr_at(schedule, step):
    return float(keras.ops.convert_to_numpy(schedule(step)))


def schedule_spec(**changes):
    return {**DEFAULTS["schedule"], **changes}


def test_cosine_reaches_eta_min_at_t_max():
    s = optim.make_schedule(schedule_spec(name="cosine", t_max=10, eta_min=1e-4), 0.1, epochs=20, steps_per_epoch=5)
    assert lr_at(s, 0) == pytest.approx(0.1)
    assert lr_at(s, 25) == pytest.approx(1e-4 + (0.1 - 1e-4) / 2, rel=1e-5)
    assert lr_at(s, 50) == pytest.approx(1e-4, rel=1e-4)


def test_rmsprop_takes_the_recipes_rho_and_epsilon():
    """RMSprop's first step by hand with rho 0.99 (PyTorch's alpha) and epsilon 1e-8: v = (1 - rho) g^2,
    w -= lr g / sqrt(v + eps) (Keras adds epsilon inside the root, PyTorch outside it)."""
    optimizer = optim.make_optimizer(spec(name="rmsprop", learning_rate=0.01, rho=0.99, epsilon=1e-8), 0.01)
    assert (optimizer.rho, optimizer.epsilon) == (0.99, 1e-8)
    v = (1 - 0.99) * G ** 2
    np.testing.assert_allclose(one_step(optimizer), W - 0.01 * G / np.sqrt(v + 1e-8), rtol=1e-6)


def test_per_epoch_cosine_is_pytorchs_cosine_annealing_stepped_each_epoch():
    """CosineAnnealingLR(T_max=50) with scheduler.step() after each epoch: epoch e (from 0)
    trains at lr * (1 + cos(pi e / 50)) / 2 for all its steps."""
    s = optim.make_schedule(schedule_spec(name="cosine", t_max=50, per_epoch=True), 1e-3, epochs=50, steps_per_epoch=7)
    for epoch in (0, 1, 25, 49):
        expected = 1e-3 * (1 + np.cos(np.pi * epoch / 50)) / 2
        assert [lr_at(s, 7 * epoch + k) for k in (0, 3, 6)] == pytest.approx([expected] * 3, rel=1e-5, abs=1e-12)
    again = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(s))
    assert lr_at(again, 7 * 30 + 4) == pytest.approx(lr_at(s, 7 * 30))
    assert optim.make_schedule(schedule_spec(name="constant", per_epoch=True), 0.1, 5, 7) == 0.1


def test_warmup_ramps_linearly_then_decays():
    s = optim.make_schedule(schedule_spec(name="warmup_cosine", warmup_epochs=2), 0.1, epochs=10, steps_per_epoch=10)
    ramp = [lr_at(s, step) for step in (0, 5, 10, 15, 20)]
    np.testing.assert_allclose(ramp, [0.0, 0.025, 0.05, 0.075, 0.1], atol=1e-6)
    assert lr_at(s, 60) < 0.1 and lr_at(s, 100) == pytest.approx(0.0, abs=1e-6)


def test_step_multistep_exponential_onecycle():
    step = optim.make_schedule(schedule_spec(name="step", step_size=3, gamma=0.5), 1.0, 10, 2)
    assert [lr_at(step, s) for s in (5, 6, 12)] == pytest.approx([1.0, 0.5, 0.25])
    multi = optim.make_schedule(schedule_spec(name="multistep", milestones=[2, 5], gamma=0.1), 1.0, 10, 10)
    assert [lr_at(multi, s) for s in (19, 21, 51)] == pytest.approx([1.0, 0.1, 0.01])
    expo = optim.make_schedule(schedule_spec(name="exponential", gamma=0.9), 1.0, 10, 10)
    assert lr_at(expo, 25) == pytest.approx(0.81)
    cycle = optim.make_schedule(schedule_spec(name="onecycle"), 1.0, 10, 10)
    assert lr_at(cycle, 0) == pytest.approx(1 / 25) and lr_at(cycle, 30) == pytest.approx(1.0)
    assert lr_at(cycle, 100) == pytest.approx(1 / 25 / 1e4, rel=1e-3)


def test_onecycle_survives_serialization():
    cycle = optim.OneCycle(0.2, 100)
    again = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(cycle))
    assert lr_at(again, 40) == pytest.approx(lr_at(cycle, 40))


def test_plateau_is_a_callback():
    assert optim.make_schedule(schedule_spec(name="plateau"), 0.1, 10, 10) == 0.1
    assert isinstance(optim.plateau_callback(schedule_spec(name="plateau"), "val_loss"), keras.callbacks.ReduceLROnPlateau)
    assert optim.plateau_callback(schedule_spec(name="cosine"), "val_loss") is None


# ------------------------------------------------------------ sgd_muon


def test_orthogonalize_sets_singular_values_near_one_and_keeps_singular_vectors():
    matrix = np.random.default_rng(0).normal(size=(64, 576)).astype(np.float32)
    u, _, vt = np.linalg.svd(matrix, full_matrices=False)
    out = keras.ops.convert_to_numpy(optim.orthogonalize(matrix))
    core = u.T @ out @ vt.T  # diagonal if the singular vectors are kept
    assert np.all((np.diag(core) > 0.5) & (np.diag(core) < 1.5))
    np.testing.assert_allclose(core - np.diag(np.diag(core)), 0, atol=1e-3)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(optim.orthogonalize(matrix.T)), out.T, atol=1e-5)


def muon_step(spec_changes, gradients, kernel, bias, lr=0.5):
    optimizer = optim.make_optimizer(spec(name="sgd_muon", learning_rate=lr, **spec_changes), lr)
    variables = [keras.Variable(kernel.copy()), keras.Variable(bias.copy())]
    for kernel_grad, bias_grad in gradients:
        optimizer.apply([keras.ops.convert_to_tensor(kernel_grad), keras.ops.convert_to_tensor(bias_grad)], variables)
    return [keras.ops.convert_to_numpy(v) for v in variables]


def test_sgd_muon_steps_kernels_by_muon_and_everything_else_by_sgd():
    rng = np.random.default_rng(1)
    kernel, bias = rng.normal(size=(3, 3, 4, 8)).astype(np.float32), W.copy()
    g1, g2 = (rng.normal(size=kernel.shape).astype(np.float32) for _ in range(2))
    changes = dict(momentum=0.0, weight_decay=0.1, muon_learning_rate=0.2, muon_momentum=0.6, nesterov=True)
    new_kernel, new_bias = muon_step(changes, [(g1, G), (g2, G)], kernel, bias)

    def muon(w, step):  # kernel rescaled to norm sqrt(8), then the orthogonalised step at 0.2
        flat = keras.ops.convert_to_numpy(optim.orthogonalize(step.reshape(-1, 8))).reshape(w.shape)
        return w * np.sqrt(8) / np.linalg.norm(w) - 0.2 * flat

    m1 = g1
    m2 = 0.6 * m1 + g2
    expected = muon(muon(kernel, g1 + 0.6 * m1), g2 + 0.6 * m2)  # Nesterov; no L2 on kernels
    np.testing.assert_allclose(new_kernel, expected, atol=1e-5)
    b1 = W - 0.5 * (G + 0.1 * W)
    np.testing.assert_allclose(new_bias, b1 - 0.5 * (G + 0.1 * b1), rtol=1e-6)  # plain SGD with L2
    # Muon's step does not depend on the gradient's scale; SGD's would
    scaled, _ = muon_step(changes, [(100 * g1, G), (100 * g2, G)], kernel, bias)
    np.testing.assert_allclose(scaled, new_kernel, atol=1e-5)


def test_sgd_muon_survives_serialization():
    optimizer = optim.make_optimizer(spec(name="sgd_muon", learning_rate=1.5, muon_learning_rate=0.3, muon_momentum=0.5), 1.5)
    again = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
    assert type(again) is optim.SGDMuon
    assert again.muon_lr_ratio == pytest.approx(0.2) and again.muon_momentum == 0.5


def test_sgd_muon_state_is_in_its_variables_so_a_resumed_run_continues_the_same():
    """What BackupAndRestore saves and restores is ``optimizer.variables``: Muon's momentum must be there."""
    rng = np.random.default_rng(2)
    kernel, g1, g2 = (rng.normal(size=(3, 3, 2, 4)).astype(np.float32) for _ in range(3))

    def fresh():
        return optim.make_optimizer(spec(name="sgd_muon", learning_rate=0.5, muon_momentum=0.6), 0.5)

    running, variable = fresh(), keras.Variable(kernel.copy())
    running.apply([keras.ops.convert_to_tensor(g1)], [variable])
    resumed, copy = fresh(), keras.Variable(keras.ops.convert_to_numpy(variable))
    resumed.build([copy])
    for saved, restored in zip(running.variables, resumed.variables):
        restored.assign(saved)
    running.apply([keras.ops.convert_to_tensor(g2)], [variable])
    resumed.apply([keras.ops.convert_to_tensor(g2)], [copy])
    np.testing.assert_allclose(keras.ops.convert_to_numpy(copy), keras.ops.convert_to_numpy(variable), atol=1e-6)
