import pytest

from kcifar import recipe
from kcifar.errors import KcifarError


def test_precedence_defaults_file_overrides(tmp_path):
    path = tmp_path / "exp.toml"
    path.write_text('model = "vgg16"\n[train]\nepochs = 50\nbatch_size = 64\n[optimizer]\nlearning_rate = 0.01\n')
    resolved = recipe.resolve(path, ["train.epochs=3", {"optimizer": {"name": "sgd"}}])
    assert resolved["model"] == "vgg16" and resolved["name"] == "exp"
    assert resolved["train"] == {**recipe.DEFAULTS["train"], "epochs": 3, "batch_size": 64}
    assert resolved["optimizer"]["learning_rate"] == 0.01 and resolved["optimizer"]["name"] == "sgd"
    assert recipe.resolve()["name"] == recipe.DEFAULTS["model"]


def test_override_values_are_typed():
    assert recipe.parse_override("schedule.milestones=[30, 60]") == {"schedule": {"milestones": [30, 60]}}
    assert recipe.parse_override("model=vgg16") == {"model": "vgg16"}
    assert recipe.parse_override("train.deterministic=true") == {"train": {"deterministic": True}}


def test_round_trip_through_toml(tmp_path):
    resolved = recipe.resolve(None, ['name="a b"', "schedule.milestones=[1, 2]", "model_args.dropout=0.25"])
    path = tmp_path / "r.toml"
    path.write_text(recipe.to_toml(resolved))
    assert recipe.read_toml(path) == resolved


@pytest.mark.parametrize("override, message", [
    ("optimizer.lr=0.1", "unknown recipe key 'optimizer.lr'; valid keys here: name, learning_rate"),
    ("optimizer.name=adagrad", "choose one of: sgd, sgd_muon, adam, adamw, rmsprop"),
    ("train.epochs=ten", "'train.epochs' must be int"),
    ("train.epochs=0", "train.epochs must be at least 1"),
    ("train.deterministic=1", "'train.deterministic' must be bool"),
    ("schedule.name=linear", "choose one of: constant, step"),
    ("data.val_size=0", "early stopping needs a validation split"),
    ("nonsense", "is not key=value"),
])
def test_bad_values_name_the_problem(override, message):
    with pytest.raises(KcifarError, match=message.replace("(", r"\(")):
        recipe.resolve(None, [override])


def test_missing_and_broken_recipe_files(tmp_path):
    with pytest.raises(KcifarError, match="not found"):
        recipe.resolve(tmp_path / "nope.toml")
    (tmp_path / "bad.toml").write_text("model = \n")
    with pytest.raises(KcifarError, match="not valid TOML"):
        recipe.resolve(tmp_path / "bad.toml")
