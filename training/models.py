"""CIFAR-10 models of the low-rank-bias papers, behind a registry users can extend.

    from training.models import build_model, register_model

    model = build_model("mlp", depth=10, width=100)        # MLP-BN-10-100

    @register_model("tiny_cnn")
    def tiny_cnn(num_classes=10, width=32):
        return torch.nn.Sequential(...)

Built in:

* ``resnet18``: ResNet-18 in its CIFAR form (3x3 stride-1 stem, no max-pool, four stages of two
  basic blocks, 1x1-conv + BN shortcuts where the shape changes, global average pool, ``fc``).
  ``width`` is the first stage's channel count (64 in the paper model).
* ``vgg16_bn``: the CIFAR VGG-16 with batch norm (13 3x3 convs with BN and ReLU, five 2x2
  max-pools, one Linear classifier on the 512 features). ``width`` scales the channel counts
  (64 in the paper model).
* ``mlp``: MLP-BN-L-H of Galanti et al. (flattened 3x32x32 input, ``depth`` hidden Linear
  layers of ``width`` units, each followed by BatchNorm1d and ReLU, then a Linear classifier
  ``fc``); the default is MLP-BN-10-100. ``batchnorm=False`` drops the BN layers.

Average threshold rank layer set (``rank_layers``), as in Galanti et al., "SGD and Weight Decay
Secretly Minimize the Rank of Your Neural Network": for ``resnet18`` the stem conv and both
convs of every basic block (17 matrices; shortcuts and ``fc`` excluded,
``lowrank_kernels.galanti_resnet18_layers``); for every other model, every tracked weight matrix
(Linear, conv, ...) except the classifier, i.e. the last Linear layer (the 10 hidden layers of
MLP-BN-10-100, the 13 convs of VGG-16). A registered model can pass its own ``rank_layers``.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from lowrank_kernels import galanti_resnet18_layers
from lowrank_kernels.spectral import tracked_matrices

NUM_CLASSES = 10


@dataclass(frozen=True)
class ModelSpec:
    """A registered model: its builder and how to pick its average-rank layers."""

    name: str
    builder: Callable[..., nn.Module]
    rank_layers: Callable[[nn.Module], list[str]] | None = None
    description: str = ""

    def options(self) -> list[str]:
        """Keyword options the builder takes (``num_classes`` aside)."""
        params = inspect.signature(self.builder).parameters.values()
        return [p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
                and p.name != "num_classes"]


_REGISTRY: dict[str, ModelSpec] = {}


def register_model(name: str, *, rank_layers: Callable[[nn.Module], list[str]] | None = None,
                   description: str = "", overwrite: bool = False):
    """Decorator adding ``builder(num_classes=10, **options) -> nn.Module`` under ``name``.

    ``rank_layers(model) -> [parameter names]`` picks the weights averaged into the average
    threshold rank; by default every tracked matrix but the classifier (the last Linear).
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"model name must be a non-empty string, got {name!r}")

    def decorate(builder):
        if not callable(builder):
            raise TypeError(f"register_model({name!r}) needs a callable builder, got {type(builder).__name__}")
        if name in _REGISTRY and not overwrite:
            raise ValueError(f"a model named {name!r} is already registered; pass overwrite=True to replace it")
        if "num_classes" not in inspect.signature(builder).parameters:
            raise TypeError(f"the builder of {name!r} must accept a num_classes argument")
        doc = description or (inspect.getdoc(builder) or "").split("\n")[0]
        _REGISTRY[name] = ModelSpec(name, builder, rank_layers, doc)
        return builder

    return decorate


def available_models() -> list[str]:
    return sorted(_REGISTRY)


def get_model_spec(name: str) -> ModelSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; registered models: {', '.join(available_models())} "
                         "(add one with training.models.register_model)") from None


def build_model(name: str, num_classes: int = NUM_CLASSES, **options) -> nn.Module:
    """Build a registered model. Options the builder does not take are an error (not ignored)."""
    spec = get_model_spec(name)
    accepted = spec.options()
    takes_any = any(p.kind == p.VAR_KEYWORD for p in inspect.signature(spec.builder).parameters.values())
    unknown = sorted(k for k in options if k not in accepted)
    if unknown and not takes_any:
        raise ValueError(f"model {name!r} does not take option(s) {unknown}; it takes {accepted or 'none'}")
    model = spec.builder(num_classes=num_classes, **options)
    if not isinstance(model, nn.Module):
        raise TypeError(f"the builder of {name!r} returned {type(model).__name__}, not an nn.Module")
    return model


def classifier_excluded_layers(model: nn.Module) -> list[str]:
    """Every tracked weight matrix of ``model`` except the last Linear (the classifier)."""
    tracked = tracked_matrices(model)
    linear = [t.name for t in tracked if t.kind == "linear"]
    classifier = linear[-1] if linear else None
    names = [t.name for t in tracked if t.name != classifier]
    if not names:
        raise ValueError(f"{type(model).__name__} has no weight matrix besides its classifier to average the rank over")
    return names


def rank_layers(name: str, model: nn.Module) -> list[str]:
    """The parameter names whose threshold ranks make up the average threshold rank."""
    spec = get_model_spec(name)
    chosen = (spec.rank_layers or classifier_excluded_layers)(model)
    known = {t.name for t in tracked_matrices(model)}
    stray = [n for n in chosen if n not in known]
    if stray:
        raise ValueError(f"rank_layers of model {name!r} names {stray}, which are not tracked weight matrices")
    return list(chosen)


# ------------------------------------------------------------------------------------ ResNet-18
class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers with a residual connection (He et al., "Deep Residual Learning")."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(channels))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    def __init__(self, num_classes: int = NUM_CLASSES, width: int = 64):
        super().__init__()
        # The CIFAR stem: 32x32 inputs keep their resolution into the first stage.
        self.conv1 = nn.Conv2d(3, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        stages, in_channels = [], width
        for i, stride in enumerate((1, 2, 2, 2)):
            channels = width * 2 ** i
            stages.append(nn.Sequential(BasicBlock(in_channels, channels, stride), BasicBlock(channels, channels, 1)))
            in_channels = channels
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(out, 1), 1))


def _positive(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


@register_model("resnet18", rank_layers=galanti_resnet18_layers,
                description="ResNet-18, CIFAR variant (3x3 stem, no max-pool)")
def resnet18(num_classes: int = NUM_CLASSES, width: int = 64) -> nn.Module:
    """ResNet-18, CIFAR variant (3x3 stem, no max-pool)."""
    return ResNet18(_positive("num_classes", num_classes), _positive("width", width))


# ------------------------------------------------------------------------------------ VGG-16-BN
VGG16_LAYOUT = (1, 1, "M", 2, 2, "M", 4, 4, 4, "M", 8, 8, 8, "M", 8, 8, 8, "M")  # x width; M = max-pool


class VGG(nn.Module):
    def __init__(self, layout, num_classes: int = NUM_CLASSES, width: int = 64):
        super().__init__()
        layers, in_channels = [], 3
        for item in layout:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                channels = item * width
                layers += [nn.Conv2d(in_channels, channels, 3, padding=1), nn.BatchNorm2d(channels),
                           nn.ReLU(inplace=True)]
                in_channels = channels
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.features(x), 1))


@register_model("vgg16_bn", description="VGG-16 with batch norm, CIFAR variant (one Linear classifier)")
def vgg16_bn(num_classes: int = NUM_CLASSES, width: int = 64) -> nn.Module:
    """VGG-16 with batch norm, CIFAR variant (one Linear classifier)."""
    return VGG(VGG16_LAYOUT, _positive("num_classes", num_classes), _positive("width", width))


# ------------------------------------------------------------------------------------ MLP
class MLP(nn.Module):
    def __init__(self, num_classes: int = NUM_CLASSES, depth: int = 10, width: int = 100,
                 batchnorm: bool = True, in_features: int = 3 * 32 * 32):
        super().__init__()
        layers, fan_in = [], in_features
        for _ in range(depth):
            layers.append(nn.Linear(fan_in, width))
            if batchnorm:
                layers.append(nn.BatchNorm1d(width))
            layers.append(nn.ReLU(inplace=True))
            fan_in = width
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(fan_in, num_classes)

    def forward(self, x):
        return self.fc(self.layers(torch.flatten(x, 1)))


@register_model("mlp", description="MLP-BN-depth-width (default MLP-BN-10-100)")
def mlp(num_classes: int = NUM_CLASSES, depth: int = 10, width: int = 100, batchnorm: bool = True,
        in_features: int = 3 * 32 * 32) -> nn.Module:
    """MLP-BN-depth-width (default MLP-BN-10-100)."""
    if not isinstance(batchnorm, bool):
        raise ValueError(f"batchnorm must be True or False, got {batchnorm!r}")
    return MLP(_positive("num_classes", num_classes), _positive("depth", depth), _positive("width", width),
               batchnorm, _positive("in_features", in_features))
