"""Model templates: what a job trains, where the model is cut, and how inputs are prepared.

A `Template` names a data set, the shape of one input sample, the labels, the trainable
head (a stack of `LayerSpec`) and the frozen backbone in front of it. The backbone runs on
devices with onnxruntime and never changes during a job; the head is what devices train.

Templates:

``digits_mlp``
    scikit-learn's 8x8 digits, 64 pixels scaled to [0, 1]. Cut at the input: there is no
    backbone, the whole 64-512-256-10 MLP (167,178 parameters) trains on the devices.
``digits_cnn``
    The same digits as a (1, 8, 8) image. A small conv backbone (2 conv + pool blocks, 128
    features) is frozen; an MLP head (128-64-10) trains. A frozen backbone of random weights
    is a poor feature extractor, so the coordinator pretrains it on a server-side split
    that is disjoint from the holdout and from all device data (`server_fraction`); see
    `cloud_coordinator.baseline.fit_backbone`.
``machine_health``
    A tabular stand-in for a machine-health classifier: scikit-learn's breast cancer data
    set (30 continuous measurements, 2 classes relabelled ``fault`` / ``healthy``). It was
    chosen over ``wine`` because it has three times the samples (569 vs 178), so a fleet of
    ten devices still gets a few dozen samples each, and it is binary like a fault detector.
    Its features span four orders of magnitude, so they are standardized; the mean and scale
    are fitted on the server-side split only (no holdout or device data) and live in the
    frozen backbone (a `Standardize` layer), so a device feeds raw measurements.

The ``preprocessing`` of every template is ``{"scale": s, "offset": o}``: the model input is
``raw * scale + offset``, reshaped to ``input_shape``; a device applies it before inference.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np
import numpy.typing as npt
import torch

from protocols.model_format import LayerSpec, head_parameter_count
from protocols.schema import Scalar

BACKBONE_KINDS = ("none", "conv", "standardize")
DATASETS = ("digits", "breast_cancer")


class Standardize(torch.nn.Module):
    """A frozen ``(x - mean) / std`` layer whose statistics are fitted on server data."""

    mean: torch.Tensor
    inv_std: torch.Tensor

    def __init__(self, width: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(width))
        self.register_buffer("inv_std", torch.ones(width))

    def fit(self, x: npt.NDArray[np.floating]) -> None:
        """Set the statistics from samples `x` (rows); a constant feature gets scale 1."""
        data = torch.as_tensor(np.asarray(x, dtype=np.float64).reshape(len(x), -1))
        std = data.std(dim=0, correction=0)
        std = torch.where(std > 1e-12, std, torch.ones_like(std))
        self.mean.copy_(data.mean(dim=0).float())
        self.inv_std.copy_((1.0 / std).float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Standardized `x`."""
        return (x - self.mean) * self.inv_std


class FusedModel(torch.nn.Module):
    """Backbone then head; parameters are named ``backbone.*`` and ``head.<i>.*``."""

    def __init__(self, backbone: torch.nn.Module | None, head: torch.nn.Sequential) -> None:
        super().__init__()
        self.backbone = backbone if backbone is not None else torch.nn.Identity()
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits for a batch of inputs."""
        out: torch.Tensor = self.head(self.backbone(x))
        return out


def _seeded(seed: int) -> torch.Generator:
    generator = torch.Generator()
    generator.manual_seed(seed)
    return generator


def _reinit(module: torch.nn.Module, seed: int) -> None:
    """Re-initialize conv and linear layers like torch does, but from `seed` alone."""
    generator = _seeded(seed)
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, torch.nn.Linear | torch.nn.Conv2d):
                fan_in = layer.weight[0].numel()
                bound = 1.0 / float(np.sqrt(fan_in))
                layer.weight.uniform_(-bound, bound, generator=generator)
                if layer.bias is not None:
                    layer.bias.uniform_(-bound, bound, generator=generator)


@dataclass(frozen=True)
class Template:
    """A trainable model: data set, input and label schema, frozen backbone, trainable head."""

    name: str
    dataset: str
    input_shape: tuple[int, ...]
    num_classes: int
    labels: tuple[str, ...]
    head_layers: tuple[LayerSpec, ...]
    preprocessing: dict[str, Scalar] = field(default_factory=dict)
    backbone: str = "none"
    server_fraction: float = 0.0

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise ValueError(f"unknown data set {self.dataset!r}; known: {DATASETS}")
        if self.backbone not in BACKBONE_KINDS:
            raise ValueError(f"unknown backbone {self.backbone!r}; known: {BACKBONE_KINDS}")
        if len(self.labels) != self.num_classes:
            raise ValueError("there must be one label per class")
        linears = [layer for layer in self.head_layers if layer.kind == "linear"]
        if not linears or linears[-1].outputs != self.num_classes:
            raise ValueError("the head must end in a linear layer with one output per class")
        if self.backbone == "none" and linears[0].inputs != int(np.prod(self.input_shape)):
            raise ValueError("with no backbone the head takes the flat input")
        if not 0.0 <= self.server_fraction < 1.0:
            raise ValueError("server_fraction must be in [0, 1)")
        if self.backbone != "none" and self.server_fraction == 0.0:
            raise ValueError("a backbone needs a server-side split to be fitted on")

    @property
    def feature_width(self) -> int:
        """Width of the backbone's output, i.e. the head's input."""
        return next(layer.inputs for layer in self.head_layers if layer.kind == "linear")

    @property
    def head_parameters(self) -> int:
        """How many numbers the devices train."""
        return head_parameter_count(self.head_layers)

    def build_backbone(self, seed: int = 0) -> torch.nn.Module | None:
        """A fresh, frozen backbone in eval mode (unfitted), or None when cut at the input."""
        module: torch.nn.Module
        if self.backbone == "none":
            return None
        if self.backbone == "standardize":
            module = Standardize(int(np.prod(self.input_shape)))
        else:
            channels = self.input_shape[0]
            module = torch.nn.Sequential(
                torch.nn.Conv2d(channels, 16, 3, padding=1),
                torch.nn.ReLU(),
                torch.nn.MaxPool2d(2),
                torch.nn.Conv2d(16, 32, 3, padding=1),
                torch.nn.ReLU(),
                torch.nn.MaxPool2d(2),
                torch.nn.Flatten(),
            )
            _reinit(module, seed)
        module.requires_grad_(False)
        return module.eval()

    def build_head(self, seed: int = 0) -> torch.nn.Sequential:
        """The trainable head; its state-dict keys and shapes equal ``head_shapes(head_layers)``."""
        layers: list[torch.nn.Module] = []
        for spec in self.head_layers:
            if spec.kind == "linear":
                layers.append(torch.nn.Linear(spec.inputs, spec.outputs))
            else:
                layers.append(torch.nn.ReLU())
        head = torch.nn.Sequential(*layers)
        _reinit(head, seed + 1)
        return head


def _mlp(*widths: int) -> tuple[LayerSpec, ...]:
    layers: list[LayerSpec] = []
    for inputs, outputs in itertools.pairwise(widths):
        if layers:
            layers.append(LayerSpec("relu"))
        layers.append(LayerSpec("linear", inputs, outputs))
    return tuple(layers)


_DIGIT_LABELS = tuple(str(d) for d in range(10))
_PIXELS = {"scale": 1.0 / 16.0, "offset": 0.0}

TEMPLATES: Mapping[str, Template] = MappingProxyType(
    {
        "digits_mlp": Template(
            name="digits_mlp",
            dataset="digits",
            input_shape=(64,),
            num_classes=10,
            labels=_DIGIT_LABELS,
            head_layers=_mlp(64, 512, 256, 10),
            preprocessing=dict(_PIXELS),
        ),
        "digits_cnn": Template(
            name="digits_cnn",
            dataset="digits",
            input_shape=(1, 8, 8),
            num_classes=10,
            labels=_DIGIT_LABELS,
            head_layers=_mlp(128, 64, 10),
            preprocessing=dict(_PIXELS),
            backbone="conv",
            server_fraction=0.15,
        ),
        "machine_health": Template(
            name="machine_health",
            dataset="breast_cancer",
            input_shape=(30,),
            num_classes=2,
            labels=("fault", "healthy"),
            head_layers=_mlp(30, 32, 2),
            preprocessing={"scale": 1.0, "offset": 0.0},
            backbone="standardize",
            server_fraction=0.15,
        ),
    }
)


def template_names() -> tuple[str, ...]:
    """Names of all templates, sorted."""
    return tuple(sorted(TEMPLATES))


def get_template(name: str) -> Template:
    """The template called `name`; ValueError listing the valid names otherwise."""
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ValueError(
            f"unknown model template {name!r}; valid: {', '.join(template_names())}"
        ) from None
