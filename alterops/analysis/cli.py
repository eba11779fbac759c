"""``alterops analyze``: Fourier and variance analysis of a model's blocks.

    alterops analyze alternet50 --images val/ --image-size 32 --variant cifar --out analysis/
    alterops analyze mypkg.models:build --random 64 --image-size 224 --kwargs '{"depth": 12}'

Writes ``fourier.png`` (Δ log amplitude vs frequency coloured by depth), ``high_frequency.png``
(high-frequency Δ vs depth), ``variance.png`` (variance vs depth) and ``statistics.json`` (all
numbers) to ``--out``. ``alterops/cli.py`` wires :func:`add_parser` and :func:`run`.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

__all__ = ["add_parser", "run"]


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
        description="Run a model over images (or random inputs), record every block's output and write "
                    "the paper's Fourier and variance figures (PNG) and the numbers (JSON).")
    p.add_argument("model", help="'package.module:factory' (or an nn.Module attribute) or a built-in name: "
                                 "alternet50, preresnet50")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--images", metavar="DIR", help="folder of images (searched recursively)")
    src.add_argument("--random", metavar="N", type=int, default=None,
                     help="use N standard-normal random images instead (default when --images is absent: 8)")
    p.add_argument("--image-size", type=int, default=224, help="inputs are resized to this square size (default 224)")
    p.add_argument("--channels", type=int, default=3, help="input channels of random images (default 3)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-images", type=int, default=None, help="use at most this many images of the folder")
    p.add_argument("--normalize", choices=("imagenet", "cifar", "none"), default="imagenet",
                   help="normalisation of folder images (default imagenet)")
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
    p.add_argument("--title", default=None, help="title of the figures")
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
        if args.images:
            batches = data.image_batches(args.images, args.image_size, args.batch_size, normalize=args.normalize,
                                         limit=args.max_images)
            source = {"images": os.path.abspath(args.images), "count": sum(int(b.shape[0]) for b in batches)}
        else:
            count = args.random if args.random is not None else 8
            if count < 1:
                raise ValueError("--random must be >= 1")
            batches = list(data.random_batches(count, args.image_size, args.batch_size, channels=args.channels,
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
        paths = plots.save_all(result, args.out, title=args.title)
    report = {"model": args.model, "model_kwargs": kwargs, "input": source, "image_size": args.image_size,
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
