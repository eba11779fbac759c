"""The analysis toolkit: hooks on a small CNN and a tiny ViT-like model, running statistics
against statistics of the concatenated maps computed directly, plots, the frequency-noise
sweep, and ``alterops analyze`` end to end."""
import json
import math
import os
import sys
import textwrap

import pytest
import torch
from torch import nn

from alterops.analysis import (AnalysisResult, FeatureRecorder, analyze, default_blocks, frequency_noise_sweep,
                               plot_fourier, plot_high_frequency, plot_variance, save_all, to_feature_map)
from alterops.analysis import cli as analysis_cli
from alterops.analysis import data as analysis_data

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def paper_delta(x, eps=1e-6):
    x = x.double()
    a = torch.log(torch.fft.fft2(x).abs() + eps)
    h, w = x.shape[-2:]
    a = torch.roll(a, shifts=(h // 2, w // 2), dims=(-2, -1)).mean(dim=(0, 1))
    d = a.diag()[h // 2:]
    return d - d[0]


def small_cnn():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(),
        nn.Conv2d(6, 6, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv2d(6, 5, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 4),
    )


class Attention(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        a = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(q.shape[-1]), dim=-1)
        return self.proj(a @ v)


class AttnResidual(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = Attention(dim)

    def forward(self, x):
        return x + self.attn(self.norm(x))


class MlpResidual(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        return (x + self.fc(self.norm(x)),)  # tuple output, like Hugging Face layers


class PatchEmbed(nn.Module):
    def __init__(self, dim, patch):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls = nn.Parameter(torch.randn(1, 1, dim))

    def forward(self, x):
        t = self.proj(x).flatten(2).transpose(1, 2)
        return torch.cat([self.cls.expand(t.shape[0], -1, -1), t], dim=1)


class TinyViT(nn.Module):
    def __init__(self, dim=8, depth=2, patch=2, classes=3):
        super().__init__()
        self.embed = PatchEmbed(dim, patch)
        layers = []
        for _ in range(depth):
            layers += [AttnResidual(dim), MlpResidual(dim)]
        self.blocks = nn.ModuleList(layers)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.embed(x)
        for blk in self.blocks:
            out = blk(x)
            x = out[0] if isinstance(out, tuple) else out
        return self.head(x[:, 0])


def capture(model, names, batches, convert):
    """Block outputs collected plainly (the test's own hooks), concatenated over batches."""
    mods = dict(model.named_modules())
    seen = {n: [] for n in names}
    handles = [mods[n].register_forward_hook(lambda m, a, o, n=n: seen[n].append(convert(o))) for n in names]
    with torch.no_grad():
        for b in batches:
            model(b)
    for h in handles:
        h.remove()
    return {n: torch.cat(v) for n, v in seen.items()}


# ---------------------------------------------------------------------------------------
# to_feature_map
# ---------------------------------------------------------------------------------------
def test_to_feature_map_tokens_and_cls():
    tokens = torch.randn(2, 17, 5)
    fmap = to_feature_map(tokens)  # auto: 17 is not a square, 16 is -> CLS dropped
    assert fmap.shape == (2, 5, 4, 4)
    r, c = 2, 3
    torch.testing.assert_close(fmap[:, :, r, c], tokens[:, 1 + r * 4 + c, :])
    assert to_feature_map(torch.randn(2, 16, 5)).shape == (2, 5, 4, 4)
    assert to_feature_map(torch.randn(2, 16, 5), cls_token=True) is None  # 15 tokens: not a square
    assert to_feature_map(torch.randn(2, 10, 5)).shape == (2, 5, 3, 3)  # 9 tokens after the CLS
    assert to_feature_map(torch.randn(2, 11, 5)) is None
    assert to_feature_map(torch.randn(2, 17, 5), cls_token=False) is None
    x = torch.randn(1, 2, 3, 4)
    assert to_feature_map((x, "aux")) is x
    assert to_feature_map(torch.randn(4, 10)) is None
    assert to_feature_map(torch.ones(1, 2, 3, 3, dtype=torch.long)) is None


# ---------------------------------------------------------------------------------------
# Hooks and running statistics
# ---------------------------------------------------------------------------------------
def test_hooks_on_small_cnn_match_direct_statistics():
    model = small_cnn()
    blocks = default_blocks(model)
    assert blocks == [str(i) for i in range(8)]
    g = torch.Generator().manual_seed(1)
    batches = [torch.randn(3, 3, 12, 12, generator=g) for _ in range(2)] + [torch.randn(1, 3, 12, 12, generator=g)]
    result = analyze(model, batches)
    # maps: 0..4 (conv, relu, conv/2, relu, conv), 5 is 1x1 (skipped), 6 and 7 not maps.
    assert result.names == ["0", "1", "2", "3", "4"]
    assert result.downsample == [2] and result.msa == []
    assert result.depth == [0.0, 0.25, 0.5, 0.75, 1.0]
    maps = capture(model, result.names, batches, lambda o: o)
    for i, name in enumerate(result.names):
        x = maps[name]
        torch.testing.assert_close(result.delta[i], paper_delta(x), rtol=0, atol=5e-5)
        assert result.variance[i] == pytest.approx(x.double().var(dim=(2, 3)).mean().item(), rel=1e-5)
        assert result.planes[i] == x.shape[0] * x.shape[1]
        assert result.kind[i] == "diagonal"
        assert result.high_frequency[i] == pytest.approx(float(result.delta[i][-1]))


def test_hooks_on_tiny_vit_drop_cls_and_reshape():
    torch.manual_seed(0)
    model = TinyViT()
    assert default_blocks(model) == ["embed", "blocks.0", "blocks.1", "blocks.2", "blocks.3", "head"]
    batches = [torch.randn(2, 3, 8, 8) for _ in range(2)]
    result = analyze(model, batches)
    assert result.names == ["embed", "blocks.0", "blocks.1", "blocks.2", "blocks.3"]  # head gives logits
    assert result.msa == [1, 3]  # the attention residuals
    assert result.downsample == []
    assert all(s == (8, 4, 4) for s in result.shapes)

    def tokens_to_map(o):
        t = o[0] if isinstance(o, tuple) else o
        return t[:, 1:].reshape(t.shape[0], 4, 4, -1).permute(0, 3, 1, 2)

    maps = capture(model, result.names, batches, tokens_to_map)
    for i, name in enumerate(result.names):
        torch.testing.assert_close(result.delta[i], paper_delta(maps[name]), rtol=0, atol=5e-5)
        assert result.variance[i] == pytest.approx(maps[name].double().var(dim=(2, 3)).mean().item(), rel=1e-5)


def test_recorder_keeps_no_maps_and_handles_non_square():
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 1))
    with FeatureRecorder(model, blocks=["0", "1"], msa_blocks=["1"], downsample_blocks=()) as rec:
        for _ in range(3):
            model(torch.randn(2, 3, 6, 10))
            assert rec._pending == []  # reduced right after every forward
        res = rec.results()
    assert len(model._forward_hooks) == 0 and len(model[0]._forward_hooks) == 0  # hooks removed
    assert res.kind == ["radial", "radial"] and res.msa == [1] and res.downsample == []
    assert res.planes == [24, 24]
    assert all(len(d) == 4 for d in res.delta)  # min(6, 10) // 2 + 1 rings


def test_recorder_bad_arguments():
    model = small_cnn()
    with pytest.raises(ValueError, match="not modules"):
        FeatureRecorder(model, blocks=["nope"])
    with pytest.raises(ValueError, match="cls_token"):
        FeatureRecorder(model, cls_token="maybe")
    with pytest.raises(TypeError, match="batch"):
        analyze(model, [object()])


# ---------------------------------------------------------------------------------------
# Plots
# ---------------------------------------------------------------------------------------
def test_plots_write_pngs(tmp_path):
    pytest.importorskip("matplotlib")
    res = AnalysisResult(names=["a", "b", "c"], depth=[0.0, 0.5, 1.0],
                         delta=[torch.tensor([0.0, -1.0, -2.0], dtype=torch.float64)] * 3,
                         kind=["diagonal"] * 3, variance=[1.0, 0.5, 2.0], shapes=[(1, 5, 5)] * 3,
                         planes=[1, 1, 1], msa=[1], downsample=[2])
    paths = save_all(res, str(tmp_path / "figs"), title="test")
    for p in paths.values():
        with open(p, "rb") as f:
            assert f.read(8) == PNG_MAGIC
    from matplotlib.figure import Figure

    fig = Figure()
    axes = fig.subplots(1, 3)
    assert plot_fourier(res, ax=axes[0]) is fig
    plot_high_frequency(res, ax=axes[1])
    plot_variance(res, str(tmp_path / "v.png"), ax=axes[2], log=True)
    assert os.path.getsize(tmp_path / "v.png") > 0


# ---------------------------------------------------------------------------------------
# Frequency-noise sweep
# ---------------------------------------------------------------------------------------
class MeanClassifier(nn.Module):
    """Class = which channel has the largest image mean: blind to zero-mean (non-DC) noise."""

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return x.mean(dim=(2, 3)) + self.dummy


def test_frequency_noise_sweep():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(12, 3, 8, 8, generator=g)
    y = x.mean(dim=(2, 3)).argmax(-1)
    y[:3] = (y[:3] + 1) % 3  # a few wrong labels: clean accuracy 75 %
    loader = [(x[:6], y[:6]), (x[6:], y[6:])]
    res = frequency_noise_sweep(MeanClassifier(), loader, frequencies=(0.25, 0.5, 0.9), width=0.1, eps=1.0)
    assert res["images"] == 12 and res["frequencies_pi"] == [0.25, 0.5, 0.9]
    assert res["clean_accuracy"] == pytest.approx(75.0)
    assert res["delta_accuracy"] == pytest.approx([0.0, 0.0, 0.0], abs=1e-9)

    class PixelClassifier(MeanClassifier):
        def forward(self, x):
            return x[:, :, 0, 0] + self.dummy

    y2 = x[:, :, 0, 0].argmax(-1)
    res2 = frequency_noise_sweep(PixelClassifier(), [(x, y2)], frequencies=(0.5,), width=0.2, eps=3.0, seed=1)
    assert res2["clean_accuracy"] == 100.0 and res2["accuracy"][0] < 100.0
    with pytest.raises(TypeError, match="labels"):
        frequency_noise_sweep(MeanClassifier(), [x])


# ---------------------------------------------------------------------------------------
# alterops analyze, end to end
# ---------------------------------------------------------------------------------------
TINY_MODELS = textwrap.dedent('''
    import torch
    from torch import nn

    def build(width=4, num_classes=3):
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU(),
                             nn.Conv2d(width, width, 3, stride=2, padding=1), nn.ReLU(),
                             nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))

    MODEL = build()
''')


def _cli(argv):
    try:
        from alterops.cli import main
    except ImportError:
        main = analysis_cli.main
    return main(argv)


@pytest.fixture
def tiny_models(tmp_path, monkeypatch):
    (tmp_path / "alterops_tiny_models.py").write_text(TINY_MODELS)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "alterops_tiny_models"
    sys.modules.pop("alterops_tiny_models", None)


def test_cli_end_to_end_with_images(tmp_path, tiny_models, capsys):
    import matplotlib.image as mpimg
    import numpy as np

    folder = tmp_path / "imgs" / "class_a"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(3):
        mpimg.imsave(folder / f"img{i}.png", rng.random((20 + i, 18, 3)))
    out = tmp_path / "out"
    rc = _cli(["analyze", f"{tiny_models}:build", "--images", str(tmp_path / "imgs"), "--image-size", "12",
               "--batch-size", "2", "--kwargs", '{"width": 5}', "--out", str(out), "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    for name in ("fourier.png", "high_frequency.png", "variance.png"):
        with open(out / name, "rb") as f:
            assert f.read(8) == PNG_MAGIC
    report = json.loads((out / "statistics.json").read_text())
    assert report["input"]["count"] == 3 and report["model_kwargs"] == {"width": 5}
    blocks = report["blocks"]
    assert [b["name"] for b in blocks] == ["0", "1", "2", "3"]
    assert [b["shape"] for b in blocks] == [[5, 12, 12], [5, 12, 12], [5, 6, 6], [5, 6, 6]]
    assert report["downsample"] == [2]
    assert all(b["delta_log_amplitude"][0] == 0.0 and len(b["delta_log_amplitude"]) == b["shape"][1] - b["shape"][1] // 2
               for b in blocks)
    assert all(b["variance"] > 0 for b in blocks)


def test_cli_random_inputs_and_module_attribute(tmp_path, tiny_models):
    out = tmp_path / "out2"
    rc = _cli(["analyze", f"{tiny_models}:MODEL", "--random", "3", "--image-size", "9", "--msa", "1",
               "--downsample", "", "--out", str(out), "--no-progress"])
    assert rc == 0
    report = json.loads((out / "statistics.json").read_text())
    assert report["input"] == {"random": 3} and report["msa"] == [1] and report["downsample"] == []


def test_cli_errors(tmp_path, tiny_models, capsys):
    assert _cli(["analyze", "no_such_module_xyz:build", "--random", "1", "--out", str(tmp_path)]) == 2
    assert "cannot import" in capsys.readouterr().err
    assert _cli(["analyze", "resnet9000", "--random", "1", "--out", str(tmp_path)]) == 2
    assert "alternet50" in capsys.readouterr().err
    assert _cli(["analyze", f"{tiny_models}:build", "--images", str(tmp_path / "none"), "--out", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_builtin_model_names_resolve_lazily():
    models = pytest.importorskip("alterops.models")
    if not hasattr(models, "preresnet50"):
        pytest.skip("alterops.models.preresnet50 not available")
    model = analysis_data.load_model("preresnet50", num_classes=3, variant="cifar")
    assert isinstance(model, nn.Module)


# ---------------------------------------------------------------------------------------
# input size from the model, titles, the variance axis, --help
# ---------------------------------------------------------------------------------------
def tiny_alternet(imagenet):
    from alterops.models import AlterNet

    torch.manual_seed(0)
    return AlterNet((2, 2, 2, 2), (0, 1, 0, 1), (1, 1, 1, 1), widths=(4, 4, 4, 4), dim_head=4, num_classes=3,
                    pool_stem=imagenet, window_size=7 if imagenet else 4)


def test_input_size_is_taken_from_the_model():
    pytest.importorskip("alterops.models")
    from alterops.models import PreResNet

    # `alterops analyze alternet50` builds the CIFAR variant: 32x32, not 224x224
    assert analysis_cli.model_input_size(analysis_data.load_model("alternet50")) == {
        "size": 32, "dataset": "cifar", "why": "the CIFAR variant (3x3 stem)"}
    assert analysis_cli.model_input_size(tiny_alternet(imagenet=True))["size"] == 224
    assert analysis_cli.model_input_size(tiny_alternet(imagenet=False))["size"] == 32
    assert analysis_cli.model_input_size(PreResNet((1, 1, 1, 1), num_classes=3, pool_stem=True))["dataset"] == "imagenet"

    class HFLike(nn.Module):
        config = type("Config", (), {"image_size": 96})()

    class TimmLike(nn.Module):
        pretrained_cfg = {"input_size": (3, 160, 160)}

    assert analysis_cli.model_input_size(HFLike())["size"] == 96
    assert analysis_cli.model_input_size(TimmLike())["size"] == 160
    assert analysis_cli.model_input_size(small_cnn())["size"] is None


TINY_ALTERNET = textwrap.dedent('''
    import torch
    from alterops.models import AlterNet

    def build():
        torch.manual_seed(0)
        return AlterNet((2, 2, 2, 2), (0, 1, 0, 1), (1, 1, 1, 1), widths=(4, 4, 4, 4), dim_head=4, num_classes=3)
''')


def test_cli_uses_the_model_input_size_and_warns_on_a_mismatch(tmp_path, monkeypatch, capsys):
    pytest.importorskip("alterops.models")
    pytest.importorskip("matplotlib")
    (tmp_path / "alterops_tiny_alternet.py").write_text(TINY_ALTERNET)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "alterops_tiny_alternet", raising=False)
    from alterops.analysis import plots as analysis_plots

    titles = []
    real_save_all = analysis_plots.save_all

    def save_all(result, folder, **kw):
        titles.append(kw.get("title"))
        return real_save_all(result, folder, **kw)

    monkeypatch.setattr("alterops.analysis.plots.save_all", save_all)
    out = tmp_path / "out"
    assert _cli(["analyze", "alterops_tiny_alternet:build", "--random", "2", "--out", str(out), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "warning" not in err
    report = json.loads((out / "statistics.json").read_text())
    assert report["image_size"] == 32 and report["model_input_size"] == 32
    assert report["image_size_from"] == "the model: the CIFAR variant (3x3 stem)"
    assert report["blocks"][0]["shape"][1:] == [32, 32]
    assert titles[-1] == "alterops_tiny_alternet:build (CIFAR variant)\n2 random images, 32x32"

    out2 = tmp_path / "out2"
    assert _cli(["analyze", "alterops_tiny_alternet:build", "--random", "1", "--image-size", "64", "--title", "mine",
                 "--out", str(out2), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "warning: --image-size 64" in err and "built for 32x32 inputs" in err and "4x the area" in err
    report = json.loads((out2 / "statistics.json").read_text())
    assert report["image_size"] == 64 and report["image_size_from"] == "--image-size"
    assert report["blocks"][0]["shape"][1:] == [64, 64] and titles[-1] == "mine"
    sys.modules.pop("alterops_tiny_alternet", None)


def test_variance_axis_is_log_when_the_range_calls_for_it():
    pytest.importorskip("matplotlib")
    from alterops.analysis.plots import wants_log_scale

    assert wants_log_scale([1.0, 0.5, 2.0]) is False  # a 4x range reads fine on a linear axis
    assert wants_log_scale([0.33, 0.037, 0.005, 1e-4]) is True  # 3300x: flat near 0 on a linear one
    assert wants_log_scale([0.33, 0.0, 1e-4]) is False  # a zero cannot go on a log axis
    assert wants_log_scale([1.0, 0.5], log=True) is True and wants_log_scale([1.0, 1e-6], log=False) is False
    with pytest.raises(ValueError, match="positive"):
        wants_log_scale([1.0, 0.0], log=True)
    with pytest.raises(ValueError, match="log must be"):
        wants_log_scale([1.0], log="sideways")

    def result(variance):
        n = len(variance)
        return AnalysisResult(names=[str(i) for i in range(n)], depth=[i / (n - 1) for i in range(n)],
                              delta=[torch.zeros(3, dtype=torch.float64)] * n, kind=["diagonal"] * n,
                              variance=variance, shapes=[(1, 5, 5)] * n, planes=[1] * n, msa=[], downsample=[])

    wide, narrow = result([0.33, 0.037, 0.005, 1e-4]), result([1.0, 0.5, 2.0, 1.5])
    assert plot_variance(wide, title="t").axes[0].get_yscale() == "log"
    assert plot_variance(narrow).axes[0].get_yscale() == "linear"
    assert plot_variance(wide, log=False).axes[0].get_yscale() == "linear"
    assert plot_variance(narrow, log=True).axes[0].get_yscale() == "log"
    assert plot_variance(wide, title="model\ndata").axes[0].get_title() == "model\ndata"


def test_analyze_help_shows_the_usage_examples(capsys):
    from alterops.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["analyze", "--help"])
    out = capsys.readouterr().out
    examples = [line.strip() for line in analysis_cli.__doc__.splitlines() if line.strip().startswith("alterops analyze ")]
    assert len(examples) >= 2
    for line in examples:
        assert line in out  # verbatim, not re-wrapped
    assert "--variance-scale" in out and "CIFAR" in out
