"""``alterops analyze``: Fourier and variance analysis of a model's blocks.

    alterops analyze alternet50 --random 8 --out analysis/
    alterops analyze alternet50 --variant imagenet --images val/ --max-images 256 --out analysis/
    alterops analyze preresnet50 --variant cifar --checkpoint preresnet50_cifar100.pt --images cifar_test/
    alterops analyze mypkg.models:build --random 64 --image-size 224 --kwargs '{"depth": 12}'

Writes ``fourier.png`` (Δ log amplitude vs frequency coloured by depth), ``high_frequency.png``
(high-frequency Δ vs depth), ``variance.png`` (variance vs depth; a log axis when the variances
span more than 100x, or as ``--variance-scale`` says) and ``statistics.json`` (all numbers) to
``--out``. The figures' title names the model, the data and the number of images.

The input size comes from the model when it says what it was built for: 32 for the CIFAR variants
of ``alternet50``/``preresnet50`` (3×3 stem), 224 for the ImageNet ones (7×7/2 stem + max-pool),
a timm model's ``pretrained_cfg["input_size"]``, a Hugging Face model's ``config.image_size``;
224 otherwise. An ``--image-size`` that differs from the model's is used, with a warning. Folder
images are normalised with the CIFAR statistics for a CIFAR variant, ImageNet's otherwise
(``--normalize``). ``alterops/cli.py`` wires :func:`add_parser` and :func:`run`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

__all__ = ["add_parser", "run", "model_input_size", "EXAMPLES"]

DEFAULT_IMAGE_SIZE = 224
# the usage examples of the module docstring, shown by ``alterops analyze --help``
EXAMPLES = "examples:\n" + "\n".join(
    "  " + line.strip() for line in (__doc__ or "").splitlines() if line.strip().startswith("alterops analyze "))


def model_input_size(model) -> dict:
    """What ``model`` says about its input: ``{"size": int or None, "dataset": "cifar" | "imagenet" |
    None, "why": str}``.

    alterops' ``AlterNet``/``PreResNet``: the stem tells the variant (3×3 conv: CIFAR, 32;
    7×7/2 conv + max-pool: ImageNet, 224). timm models: ``pretrained_cfg["input_size"]``; Hugging
    Face models: ``config.image_size``. Anything else: ``size`` None.
    """
    from torch import nn

    try:
        from alterops.models.preresnet import StagedBackbone, Stem
    except ImportError:  # pragma: no cover - the models ship with the package
        StagedBackbone = Stem = ()
    if StagedBackbone and isinstance(model, StagedBackbone) and isinstance(getattr(model, "layer0", None), Stem):
        if any(isinstance(m, nn.MaxPool2d) for m in model.layer0.modules()):
            return {"size": 224, "dataset": "imagenet", "why": "the ImageNet variant (7x7/2 stem + max-pool)"}
        return {"size": 32, "dataset": "cifar", "why": "the CIFAR variant (3x3 stem)"}
    for attr in ("pretrained_cfg", "default_cfg"):  # timm
        cfg = getattr(model, attr, None)
        if isinstance(cfg, dict) and isinstance(cfg.get("input_size"), (tuple, list)) and cfg["input_size"]:
            return {"size": int(cfg["input_size"][-1]), "dataset": None, "why": f"its {attr}['input_size']"}
    size = getattr(getattr(model, "config", None), "image_size", None)  # Hugging Face
    if isinstance(size, (tuple, list)) and size:
        size = size[-1]
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return {"size": int(size), "dataset": None, "why": "its config.image_size"}
    return {"size": None, "dataset": None, "why": ""}


def _describe(args, expected, source, size) -> str:
    """The figures' title: model (and variant), data, number of images, input size."""
    model = args.model
    if expected["dataset"]:
        model += f" ({expected['dataset'].replace('cifar', 'CIFAR').replace('imagenet', 'ImageNet')} variant)"
    if "images" in source:
        data = f"{source['count']} images from {os.path.basename(os.path.normpath(source['images']))}/"
    else:
        data = f"{source['random']} random images"
    return f"{model}\n{data}, {size}x{size}"


def _names(text):
    if text is None:
        return None
    if text == "":
        return []
    items = [t.strip() for t in text.split(",") if t.strip()]
    return [int(t) if t.lstrip("-").isdigit() else t for t in items]


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "analyze", help="Fourier (Δ log amplitude) and feature-variance analysis of a model's blocks",
        description="Run a model over images (or random inputs), record every block's output and write\n"
                    "the paper's Fourier and variance figures (PNG) and the numbers (JSON). The input size\n"
                    "is the model's (32 for CIFAR variants, 224 for ImageNet ones) unless --image-size says.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="'package.module:factory' (or an nn.Module attribute) or a built-in name: "
                                 "alternet50, preresnet50")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--images", metavar="DIR", help="folder of images (searched recursively)")
    src.add_argument("--random", metavar="N", type=int, default=None,
                     help="use N standard-normal random images instead (default when --images is absent: 8)")
    p.add_argument("--image-size", type=int, default=None,
                   help="square input size (default: the model's: 32 for CIFAR variants, 224 for ImageNet ones; "
                        "224 when the model does not say); a size that differs from the model's gets a warning")
    p.add_argument("--channels", type=int, default=3, help="input channels of random images (default 3)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-images", type=int, default=None, help="use at most this many images of the folder")
    p.add_argument("--normalize", choices=("imagenet", "cifar", "none"), default=None,
                   help="normalisation of folder images (default: cifar for a CIFAR variant, else imagenet)")
    p.add_argument("--num-classes", type=int, default=None, help="passed to the model factory")
    p.add_argument("--variant", default=None, help="passed to built-in factories: cifar or imagenet")
    p.add_argument("--kwargs", default=None, help="JSON object of keyword arguments for the model factory")
    p.add_argument("--checkpoint", default=None, help="state dict to load (torch.load; a {'state_dict': ...} is unwrapped)")
    p.add_argument("--blocks", default=None, help="comma-separated module names to record (default: automatic)")
    p.add_argument("--msa", default=None, help="blocks to shade as MSA: comma-separated names or indices "
                                               "(default: detected by class name; '' for none)")
    p.add_argument("--downsample", default=None, help="blocks to shade as downsampling (default: where the map shrinks)")
    p.add_argument("--cls-token", choices=("auto", "yes", "no"), default="auto",
                   help="drop the first token of ViT token maps (default: when N is not a square but N-1 is)")
    p.add_argument("--eps", type=float, default=1e-6)
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--backend", default=None, help="statistics backend (default: automatic)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="analysis_out", help="output folder (default ./analysis_out)")
    p.add_argument("--title", default=None,
                   help="title of the figures (default: the model, the data, the number of images and the size)")
    p.add_argument("--variance-scale", choices=("auto", "linear", "log"), default="auto",
                   help="y-axis of the variance plot (default auto: log when the variances span more than 100x)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    from . import data, hooks, plots

    try:
        kwargs = json.loads(args.kwargs) if args.kwargs else {}
        if not isinstance(kwargs, dict):
            raise ValueError("--kwargs must be a JSON object")
        if args.num_classes is not None:
            kwargs["num_classes"] = args.num_classes
        if args.variant is not None:
            kwargs["variant"] = args.variant
        model = data.load_model(args.model, **kwargs)
        if args.checkpoint:
            state = torch.load(args.checkpoint, map_location="cpu")
            if isinstance(state, dict) and "state_dict" in state:
                state = state["state_dict"]
            model.load_state_dict(state)
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        model.to(device)
        expected = model_input_size(model)
        size = args.image_size if args.image_size is not None else (expected["size"] or DEFAULT_IMAGE_SIZE)
        if size < 1:
            raise ValueError(f"--image-size must be >= 1, got {size}")
        if args.image_size is None:
            size_source = f"the model: {expected['why']}" if expected["size"] else "the default (the model does not say)"
        else:
            size_source = "--image-size"
            if expected["size"] and size != expected["size"]:
                print(f"alterops analyze: warning: --image-size {size}, but {args.model} is {expected['why']}, built "
                      f"for {expected['size']}x{expected['size']} inputs: its feature maps are "
                      f"{(size / expected['size']) ** 2:.2g}x the area it was built for (memory and time grow with "
                      f"them); leave --image-size out to use {expected['size']}", file=sys.stderr)
        normalize = args.normalize or ("cifar" if expected["dataset"] == "cifar" else "imagenet")
        if args.images:
            batches = data.image_batches(args.images, size, args.batch_size, normalize=normalize,
                                         limit=args.max_images)
            source = {"images": os.path.abspath(args.images), "count": sum(int(b.shape[0]) for b in batches)}
        else:
            count = args.random if args.random is not None else 8
            if count < 1:
                raise ValueError("--random must be >= 1")
            batches = list(data.random_batches(count, size, args.batch_size, channels=args.channels,
                                               seed=args.seed))
            source = {"random": count}
        cls = {"auto": "auto", "yes": True, "no": False}[args.cls_token]
        result = hooks.analyze(model, batches, blocks=_names(args.blocks), cls_token=cls, eps=args.eps,
                               msa_blocks=_names(args.msa), downsample_blocks=_names(args.downsample),
                               device=device, backend=args.backend, progress=not args.no_progress)
    except (ValueError, TypeError, RuntimeError, OSError) as exc:
        print(f"alterops analyze: {exc}", file=sys.stderr)
        return 2
    if not result.names:
        print("alterops analyze: no block produced a feature map; pass --blocks", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        paths = {}
        print("alterops analyze: matplotlib is not installed, so no plots were drawn; "
              "`pip install matplotlib` (or alterops[plot]) and run again for them", file=sys.stderr)
    else:
        log = {"auto": "auto", "linear": False, "log": True}[args.variance_scale]
        if log is True and not all(v > 0 for v in result.variance):
            print("alterops analyze: warning: --variance-scale log, but some variances are <= 0; the variance "
                  "plot uses a linear axis", file=sys.stderr)
            log = False
        title = args.title if args.title is not None else _describe(args, expected, source, size)
        paths = plots.save_all(result, args.out, title=title, variance_log=log)
    report = {"model": args.model, "model_kwargs": kwargs, "input": source, "image_size": size,
              "image_size_from": size_source, "model_input_size": expected["size"],
              "normalize": normalize if args.images else None,
              "eps": args.eps, "device": str(device), **result.to_dict()}
    json_path = os.path.join(args.out, "statistics.json")
    with open(json_path, "w") as f:
        json.dump(report, f, indent=1)
    print(f"recorded {len(result.names)} blocks; wrote " + ", ".join([json_path, *paths.values()]))
    return 0


def main(argv=None) -> int:
    """Stand-alone entry (``python -m alterops.analysis.cli ...``)."""
    parser = argparse.ArgumentParser(prog="alterops")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
