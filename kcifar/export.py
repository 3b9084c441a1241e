"""Export a trained model for inference outside TensorFlow's training set-up.

    python -m kcifar.export runs/NAME --format savedmodel|onnx|litert [--int8 [full|dynamic]] --out DIR
    python -m kcifar.export model.keras --format onnx --out DIR --classes cifar10

Writes the folder DIR: the model (``saved_model/``, ``model.onnx`` or ``model.tflite``)
and ``manifest.json`` (class names, input contract, source run and its test
accuracy, versions, sha256 of each file); ``python -m kcifar.predict DIR photo.jpg``
runs it. The model takes raw 0..255 RGB images like ``best.keras``, any batch size.
Each export is run back in its runtime before it is kept: a float export's
logits must match Keras' (``kcifar.deploy.FLOAT_TOLERANCE``); ``--int8`` (LiteRT:
``full`` integer, calibrated on training images of the run's data set, the
default; or ``dynamic``, int8 weights, closer to Keras, slower) has its top-1
agreement with Keras and test-accuracy change measured on the whole test split
and recorded in the manifest. The converters and runtimes are the export extra:
``pip install -e ".[export]"``.
"""


from kcifar import cli as kcli, deploy, fileio, models, rundir
from kcifar.data import load_cifar
from kcifar.errors import KcifarError
from kcifar.evaluate import resolve_target
from kcifar.predict import class_names_for_model


def source_record(run_dir, model_path) -> dict:
    """Where the exported model comes from: its file and sha256, and its run's test accuracy if any."""
    record = {"model": str(model_path), "sha256": fileio.file_sha256(model_path), "run": None,
              "test_top1": None, "test_exact_top1": None}
    metrics = rundir.read_metrics(run_dir) if run_dir else None
    if metrics:
        record.update(run=metrics.get("run"), dataset=metrics.get("dataset"),
                      test_top1=(metrics.get("test") or {}).get("top1"),
                      test_exact_top1=(metrics.get("test_exact") or {}).get("top1"))
    return record


def int8_data(run_dir, dataset, data_dir, class_names):
    """The data set the model was trained on: its training split calibrates, its test split measures."""
    settings = rundir.data_settings(rundir.read_recipe(run_dir) if run_dir else {})
    if dataset:
        if run_dir:
            raise KcifarError(f"--dataset cannot be used with run {run_dir}: its recipe.toml names the data set")
        settings["name"] = dataset
    data = load_cifar(data_dir=data_dir, **settings)
    if data.num_classes != len(class_names):
        raise KcifarError(f"{data.name} has {data.num_classes} classes but the model {len(class_names)}; "
                          "pass the --dataset it was trained on")
    return data


def describe(out, manifest) -> str:
    check = manifest["check"]
    if manifest["int8"]:
        return (f"wrote {out} (litert int8 {manifest['quantization']['mode']}): top-1 agreement with Keras "
                f"{check['top1_agreement']:.2%} on the {check['images']}; "
                f"test top-1 {check['test_top1_keras']:.2%} -> {check['test_top1_int8']:.2%}")
    return (f"wrote {out} ({manifest['format']}): logits within {check['max_abs_logit_difference']:.2g} of Keras' "
            f"on {check['images']} images")


@kcli.command
def main(argv=None):
    parser = kcli.parser("export", __doc__.split("\n")[0], shared=("overwrite", "data_dir"))
    parser.add_argument("target", help="run directory (runs/NAME, its best.keras) or a .keras model file")
    parser.add_argument("--format", required=True, help=f"one of: {', '.join(deploy.FORMATS)}")
    parser.add_argument("--int8", nargs="?", const="full", choices=deploy.INT8_MODES,
                        help="litert only: post-training int8; full (the default): integer throughout, calibrated "
                             "on training images, the fastest; dynamic: int8 weights, closer to Keras")
    parser.add_argument("--out", required=True, help="the folder to write (model and manifest.json)")
    parser.add_argument("--classes", help="for a bare .keras file: cifar10, cifar100, cifar100-coarse or a file of names")
    parser.add_argument("--dataset", choices=["cifar10", "cifar100"], help="for --int8 of a bare .keras file")
    args = parser.parse_args(argv)
    deploy.require(args.format, "export")
    if args.int8 and args.format != "litert":
        raise KcifarError(f"--int8 applies to --format litert only, not {args.format}")
    run_dir, model_path = resolve_target(args.target)
    class_names = class_names_for_model(model_path, args.classes)
    data = int8_data(run_dir, args.dataset, args.data_dir, class_names) if args.int8 else None
    model = models.load(model_path)
    manifest = deploy.export(model, args.format, args.out, class_names, source_record(run_dir, model_path),
                             int8_data=data, int8_mode=args.int8 or "full", overwrite=args.overwrite)
    print(describe(args.out, manifest))


if __name__ == "__main__":
    main()
