"""ParNet ("Non-deep Networks", Goyal et al., arXiv 2110.07641): training form and deploy form.

One file for the family, timm-style: a config dataclass per variant, a registry, and blocks with a
`reparameterize()` method. The training form mirrors the authors' released ImageNet code so their
checkpoints load (see `checkpoint.py` for the one place where names are mapped); the deploy form is
what `parnet_cpu.reparameterize` produces and what gets exported and quantized.

Topology (a DAG, not a chain)::

    x -> inits.0 (two stride-2 blocks, 1/4) --+--> streams.0 -> downsamples_2.0 ---------+
                                             +--> inits.1 (1/8) -+-> streams.1 ----------+-> downsamples_2.1
                                                                 +-> inits.2 (1/16) -> streams.2 -+-> combine -> head
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from parnet_cpu.data.fmnist import FASHION_MNIST_CLASSES, FASHION_MNIST_MEAN, FASHION_MNIST_STD
from parnet_cpu.data.preprocess import IMAGENET_MEAN, IMAGENET_STD


ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {"relu": nn.ReLU, "silu": nn.SiLU}


@dataclass(frozen=True)
class ParNetConfig:
    """Everything that defines a ParNet architecture plus its evaluation preprocessing.

    `activation` defaults to ReLU: the paper says SiLU, but the authors' released configs name it in
    a form their code does not recognise, so the official checkpoints were trained (and must be run)
    with ReLU. Choose "silu" for models you train yourself.
    """

    planes: tuple[int, int, int, int] = (92, 192, 384, 1280)
    num_blocks: tuple[int, int, int, int] = (5, 6, 6, 1)
    num_classes: int = 1000
    in_chans: int = 3
    input_size: int = 224
    activation: str = "relu"
    stem_stride: int = 2  # stride of the very first block: 2 for ImageNet, 1 for 32x32 inputs
    dropout: float = 0.0
    # evaluation preprocessing (authors: bicubic resize of the short side to S/0.875, centre crop S)
    crop_pct: float = 0.875
    interpolation: str = "bicubic"
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    class_names: tuple[str, ...] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if len(self.planes) != 4 or len(self.num_blocks) != 4:
            raise ValueError("planes and num_blocks need 4 entries: streams 1-3 and the last block")
        if self.num_blocks[-1] != 1 or min(self.num_blocks[:3]) < 2:
            raise ValueError("num_blocks must look like (n1, n2, n3, 1) with n_i >= 2 (authors' constraint)")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}")
        if self.stem_stride not in (1, 2):
            raise ValueError("stem_stride must be 1 or 2")
        if self.input_size % self.total_stride:
            raise ValueError(f"input_size must be a multiple of {self.total_stride}, got {self.input_size}")

    @property
    def total_stride(self) -> int:
        return 16 * self.stem_stride

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ParNetConfig":
        d = dict(d)
        if "crop_fraction" in d:  # checkpoints and manifests written before the name followed timm's crop_pct
            old = d.pop("crop_fraction")
            if d.setdefault("crop_pct", old) != old:
                raise ValueError(f"config has crop_pct {d['crop_pct']!r} and the older crop_fraction {old!r}: "
                                 "give one")
        for key in ("planes", "num_blocks", "mean", "std", "class_names"):
            if d.get(key) is not None:
                d[key] = tuple(d[key])
        return cls(**d)


# --------------------------------------------------------------------------------------------
# Variant registry (timm-style). Parameter counts are pinned by tests against the facts file.
MODEL_CONFIGS: dict[str, ParNetConfig] = {
    "parnet_s": ParNetConfig(planes=(92, 192, 384, 1280)),
    "parnet_m": ParNetConfig(planes=(128, 256, 512, 2048)),
    "parnet_l": ParNetConfig(planes=(160, 320, 640, 2560)),
    "parnet_xl": ParNetConfig(planes=(200, 400, 800, 3200)),
    # CIFAR-style variants: 32x32 input, first block stride 1 (so the streams run at 16/8/4 px).
    # Widths are those of ParNet-S; the paper's own CIFAR widths are not reproduced here.
    "parnet_cifar10": ParNetConfig(planes=(92, 192, 384, 1280), num_classes=10, input_size=32, stem_stride=1,
                                   crop_pct=1.0, mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616)),
    "parnet_cifar100": ParNetConfig(planes=(92, 192, 384, 1280), num_classes=100, input_size=32, stem_stride=1,
                                    crop_pct=1.0, mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762)),
    # The shipped reference model: trained on Fashion-MNIST (28x28 grey, resized to 32), SiLU, every block
    # type; class order = the dataset's label order. Weights: parnet_cpu/assets/parnet_fmnist.pt.
    "parnet_fmnist": ParNetConfig(planes=(16, 32, 64, 128), num_blocks=(3, 4, 4, 1), num_classes=10, in_chans=1,
                                  input_size=32, activation="silu", stem_stride=1, crop_pct=1.0,
                                  interpolation="bilinear", mean=FASHION_MNIST_MEAN, std=FASHION_MNIST_STD,
                                  class_names=FASHION_MNIST_CLASSES),
}
# Variants whose weights ship inside the package (file names under parnet_cpu/assets/).
SHIPPED_WEIGHTS: dict[str, str] = {"parnet_fmnist": "parnet_fmnist.pt"}
# The authors' ImageNet checkpoints (release files of github.com/imankgoyal/NonDeepNetworks, folder
# imagenet/models/ in their instructions): not shipped and never downloaded; pass them as `checkpoint=`.
AUTHORS_CHECKPOINTS: dict[str, str] = {
    "parnet_s": "planes_92_192_384_1280_num_blocks_5_6_6_1_sebv_13.pth.tar",
    "parnet_m": "planes_128_256_512_2048_num_blocks_5_6_6_1_sebv_13.pth.tar",
    "parnet_l": "planes_160_320_640_2560_num_blocks_5_6_6_1_sebv_13_dropout_lin.pth.tar",
    "parnet_xl": "reg_se13_cosine_planes_200_400_800_3200_num_blocks_5_6_6_1_sebv_13_dropout_lin.pth.tar",
}


def no_pretrained_weights_message(name: str) -> str:
    """Why `pretrained=True` cannot be honoured, and what to pass instead."""
    key = name.lower().replace("-", "_")
    if key in AUTHORS_CHECKPOINTS:
        return (f"no weights for {name!r} ship with parnet-cpu and nothing is downloaded: get the authors' "
                f"checkpoint {AUTHORS_CHECKPOINTS[key]} (release files of github.com/imankgoyal/NonDeepNetworks) "
                f"and pass checkpoint=PATH (CLI: --checkpoint PATH)")
    return (f"no pretrained weights exist for {name!r}; pass checkpoint=PATH or pretrained=False "
            f"(shipped: {', '.join(sorted(SHIPPED_WEIGHTS))})")


def shipped_weights(name: str):
    """Path of the weights shipped for a variant, or None."""
    fname = SHIPPED_WEIGHTS.get(name.lower().replace("-", "_"))
    return Path(__file__).resolve().parents[1] / "assets" / fname if fname else None


def list_models() -> list[str]:
    return sorted(MODEL_CONFIGS)


# --------------------------------------------------------------------------------------------
# Building blocks


def conv_bn(in_ch: int, out_ch: int, kernel: int, stride: int, groups: int) -> nn.Sequential:
    """Bias-free conv followed by BN, named `conv`/`bn` like the authors' (and RepVGG's) helper."""
    seq = nn.Sequential()
    seq.add_module("conv", nn.Conv2d(in_ch, out_ch, kernel, stride, kernel // 2, groups=groups, bias=False))
    seq.add_module("bn", nn.BatchNorm2d(out_ch))
    return seq


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    b, c, h, w = x.shape
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).reshape(b, c, h, w)


def bn_scale_shift(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval-mode BN as y = x*scale + shift."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return scale, bn.bias - bn.running_mean * scale


def fuse_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight, bias) of the single conv equal to bn(conv(x))."""
    scale, shift = bn_scale_shift(bn)
    return conv.weight * scale.view(-1, 1, 1, 1), shift


def pointwise_as_3x3(weight_1x1: torch.Tensor, stride: int) -> torch.Tensor:
    """Embed a 1x1 kernel (optionally preceded by a 2x2/stride-2 average pool) in a 3x3 kernel."""
    out = torch.zeros(*weight_1x1.shape[:2], 3, 3, dtype=weight_1x1.dtype)
    if stride == 1:
        out[:, :, 1, 1] = weight_1x1[:, :, 0, 0]
    else:  # window of a stride-2, pad-1 3x3 conv at output i covers input rows 2i-1..2i+1; the pool covers 2i..2i+1
        out[:, :, 1:3, 1:3] = weight_1x1 / 4.0
    return out


def affine_from_bn(bn: nn.BatchNorm2d) -> "ChannelAffine":
    affine = ChannelAffine(bn.num_features)
    scale, shift = bn_scale_shift(bn)
    affine.scale.data.copy_(scale)
    affine.shift.data.copy_(shift)
    return affine


class SEGate(nn.Module):
    """sigmoid(conv1x1(global_avg_pool(t))), times 2 for blocks without an identity branch."""

    def __init__(self, in_ch: int, out_ch: int, groups: int, doubled: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, 1, groups=groups, bias=False)
        self.doubled = doubled

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(self.conv(t.mean(dim=(2, 3), keepdim=True)))
        return 2.0 * gate if self.doubled else gate


class ParNetBlock(nn.Module):
    """RepVGG-SSE block, training form: 3x3 conv+BN, 1x1 conv+BN (after 2x2 avg-pool when strided),
    identity BN gated by Skip-Squeeze-Excitation (or, without identity, the sum gated by 2*SE(input)),
    then the activation and, for grouped blocks, a channel shuffle."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1, groups: int = 1, activation: str = "relu") -> None:
        super().__init__()
        if stride not in (1, 2) or groups not in (1, 2):
            raise ValueError("stride and groups must be 1 or 2")
        self.in_ch, self.out_ch, self.stride, self.groups, self.activation = in_ch, out_ch, stride, groups, activation
        self.dense = conv_bn(in_ch, out_ch, 3, stride, groups)
        self.pool = nn.AvgPool2d(2, 2) if stride == 2 else nn.Identity()
        self.pointwise = conv_bn(in_ch, out_ch, 1, 1, groups)
        self.identity_bn = nn.BatchNorm2d(in_ch) if (in_ch == out_ch and stride == 1) else None
        self.se = SEGate(in_ch, out_ch, groups, doubled=self.identity_bn is None)
        self.act = ACTIVATIONS[activation]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.dense(x) + self.pointwise(self.pool(x))
        if self.identity_bn is not None:
            t = self.identity_bn(x)
            out = out + t * self.se(t)
        else:
            out = out * self.se(x)
        out = self.act(out)
        return channel_shuffle(out, self.groups) if self.groups > 1 else out

    @torch.no_grad()
    def reparameterize(self) -> "ParNetBlockDeploy":
        """Deploy form (the block itself is not modified): every conv+BN folded, the 1x1 branch (after
        the 2x2 pool when strided) folded into the 3x3 kernel, the identity BN reduced to scale+shift.
        Exact in real arithmetic; fp32 rounding only."""
        fused = ParNetBlockDeploy(self.in_ch, self.out_ch, self.stride, self.groups, self.activation,
                                  has_identity=self.identity_bn is not None)
        w3, b3 = fuse_conv_bn(self.dense.conv, self.dense.bn)
        w1, b1 = fuse_conv_bn(self.pointwise.conv, self.pointwise.bn)
        fused.conv.weight.copy_(w3 + pointwise_as_3x3(w1, self.stride))
        fused.conv.bias.copy_(b3 + b1)
        if self.identity_bn is not None:
            fused.identity = affine_from_bn(self.identity_bn)
        fused.se.conv.weight.copy_(self.se.conv.weight)
        return fused.train(self.training)


class ParNetBlockDeploy(nn.Module):
    """Deploy form: one 3x3 conv with bias; the identity BN as per-channel scale+shift (kept apart
    because the SSE gate multiplies it); the same SE gate, activation and shuffle."""

    def __init__(self, in_ch: int, out_ch: int, stride: int, groups: int, activation: str, has_identity: bool) -> None:
        super().__init__()
        self.in_ch, self.out_ch, self.stride, self.groups, self.activation = in_ch, out_ch, stride, groups, activation
        self.conv = nn.Conv2d(in_ch, out_ch, 3, stride, 1, groups=groups, bias=True)
        self.identity = ChannelAffine(in_ch) if has_identity else None
        self.se = SEGate(in_ch, out_ch, groups, doubled=not has_identity)
        self.act = ACTIVATIONS[activation]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        if self.identity is not None:
            t = self.identity(x)
            out = out + t * self.se(t)
        else:
            out = out * self.se(x)
        out = self.act(out)
        return channel_shuffle(out, self.groups) if self.groups > 1 else out


class ChannelAffine(nn.Module):
    """y = x * scale + shift per channel: an eval-mode BN reduced to what it computes."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(channels))
        self.shift = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale.view(1, -1, 1, 1) + self.shift.view(1, -1, 1, 1)


class DualBN(nn.Module):
    """One normalisation per input of a fusion point (authors' MultiBatchNorm2d: `b1`, `b2`)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.b1 = nn.BatchNorm2d(channels)
        self.b2 = nn.BatchNorm2d(channels)

    def forward(self, pair: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.b1(pair[0]), self.b2(pair[1])

    @torch.no_grad()
    def reparameterize(self) -> "DualAffine":
        dual = DualAffine(self.b1.num_features)
        dual.b1, dual.b2 = affine_from_bn(self.b1), affine_from_bn(self.b2)
        return dual.train(self.training)


class DualAffine(nn.Module):
    """Deploy form of DualBN. Not folded into the next conv: that would be inexact at the padded borders."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.b1 = ChannelAffine(channels)
        self.b2 = ChannelAffine(channels)

    def forward(self, pair: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.b1(pair[0]), self.b2(pair[1])


class InterleaveConcat(nn.Module):
    """Concat two tensors channel by channel: a0, b0, a1, b1, ... (authors' Concat2d(shuffle=True))."""

    def forward(self, pair: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        a, b = pair
        n, c, h, w = a.shape
        return torch.stack((a, b), dim=2).reshape(n, 2 * c, h, w)


class ClassifierHead(nn.Module):
    def __init__(self, in_features: int, num_classes: int, dropout: float) -> None:
        super().__init__()
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(x.mean(dim=(2, 3))))


# --------------------------------------------------------------------------------------------
# The network


class ParNet(nn.Module):
    """ParNet with the authors' module names (`inits`, `streams`, `downsamples_2`, `combine`, `head`).

    The forward pass is written stage by stage (`forward_stem`, `forward_stream{1,2,3}`, `forward_tail`)
    so the multi-stream runtime can cut the exported graph at the same points.
    """

    def __init__(self, cfg: ParNetConfig) -> None:
        super().__init__()
        self.cfg = cfg
        p1, p2, p3, p_last = cfg.planes
        n1, n2, n3, _ = cfg.num_blocks
        act = cfg.activation

        def block(i: int, o: int, stride: int = 1, groups: int = 1) -> ParNetBlock:
            return ParNetBlock(i, o, stride, groups, act)

        stem_ch = min(64, p1)
        self.inits = nn.ModuleList([
            nn.Sequential(block(cfg.in_chans, stem_ch, cfg.stem_stride), block(stem_ch, p1, 2)),
            block(p1, p2, 2),
            block(p2, p3, 2),
        ])
        self.streams = nn.ModuleList([
            nn.Sequential(*[block(p, p) for _ in range(n - 1)]) for p, n in ((p1, n1), (p2, n2), (p3, n3))
        ])
        self.downsamples_2 = nn.ModuleList([
            block(p1, p2, 2),
            nn.Sequential(DualBN(p2), InterleaveConcat(), block(2 * p2, p3, 2, groups=2)),
        ])
        self.combine = nn.Sequential(
            DualBN(p3), InterleaveConcat(), block(2 * p3, p3, 1, groups=2), block(p3, p_last, 2)
        )
        self.head = ClassifierHead(p_last, cfg.num_classes, cfg.dropout)
        self.num_features = p_last

    # Stages, named after what the multi-stream runtime runs concurrently. Each stream stage ends with
    # its own input normalisation of the next fusion point (b1/b2 of the two-input BN), so that in an
    # INT8 graph a stage boundary sits right before a quantizer, exactly where OpenVINO's own fusion
    # boundary is: the cut graph then computes bit-identical results to the whole graph.
    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.inits[0](x)

    def forward_stream1(self, s: torch.Tensor) -> torch.Tensor:
        return self.downsamples_2[1][0].b2(self.downsamples_2[0](self.streams[0](s)))

    def forward_inits1(self, s: torch.Tensor) -> torch.Tensor:
        return self.inits[1](s)

    def forward_stream2(self, x2: torch.Tensor) -> torch.Tensor:
        return self.downsamples_2[1][0].b1(self.streams[1](x2))

    def forward_stream3(self, x2: torch.Tensor) -> torch.Tensor:
        return self.combine[0].b1(self.streams[2](self.inits[2](x2)))

    def forward_tail(self, y1: torch.Tensor, y2: torch.Tensor, y3: torch.Tensor) -> torch.Tensor:
        """Fusion and head, from the normalised stream outputs."""
        fused = self.downsamples_2[1][1:]((y2, y1))
        return self.head(self.combine[1:]((y3, self.combine[0].b2(fused))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.forward_stem(x)
        x2 = self.forward_inits1(s)
        return self.forward_tail(self.forward_stream1(s), self.forward_stream2(x2), self.forward_stream3(x2))

    @property
    def is_deploy(self) -> bool:
        return not any(isinstance(m, (ParNetBlock, DualBN)) for m in self.modules())

    @property
    def default_cfg(self) -> dict:
        c = self.cfg
        return {"input_size": (c.in_chans, c.input_size, c.input_size), "crop_pct": c.crop_pct,
                "interpolation": c.interpolation, "mean": c.mean, "std": c.std, "num_classes": c.num_classes}


# --------------------------------------------------------------------------------------------
# Builders


def resolve_config(name_or_cfg: str | ParNetConfig, **overrides) -> ParNetConfig:
    if isinstance(name_or_cfg, ParNetConfig):
        base = name_or_cfg
    else:
        key = name_or_cfg.lower().replace("-", "_")
        if key not in MODEL_CONFIGS:
            raise ValueError(f"unknown model {name_or_cfg!r}; available: {', '.join(list_models())}")
        base = MODEL_CONFIGS[key]
    overrides = {k: v for k, v in overrides.items() if v is not None}
    return replace(base, **overrides) if overrides else base


def build_model(cfg: ParNetConfig) -> ParNet:
    """Training-form ParNet for any configuration (eval mode, fresh random weights)."""
    return ParNet(cfg).eval()


def create_model(name: str | ParNetConfig, num_classes: int | None = None, checkpoint: str | None = None,
                 pretrained: bool = False, *, checkpoint_path: str | None = None, **overrides) -> ParNet:
    """timm/torchvision-style builder: `create_model("parnet_s", checkpoint_path="parnet_s.pth.tar")`.

    The model is returned in eval mode, training form, with random weights unless `checkpoint_path` (timm's
    name; `checkpoint` is the same argument, kept for existing callers) is given or `pretrained=True` (as in
    timm). `pretrained=True` loads the weights shipped in the package (`parnet_fmnist`) and is an error for
    every other variant: silently random "pretrained" weights would make every accuracy figure meaningless.
    """
    if checkpoint is not None and checkpoint_path is not None and checkpoint != checkpoint_path:
        raise ValueError(f"checkpoint_path={checkpoint_path!r} and checkpoint={checkpoint!r} name one argument "
                         "(timm's checkpoint_path): pass one")
    checkpoint = checkpoint_path if checkpoint_path is not None else checkpoint
    cfg = resolve_config(name, num_classes=num_classes, **overrides)
    if checkpoint is None and pretrained:
        shipped = shipped_weights(name) if isinstance(name, str) else None
        if shipped is None:
            raise ValueError(no_pretrained_weights_message(name if isinstance(name, str) else "this configuration"))
        if cfg != resolve_config(name):
            raise ValueError(f"pretrained=True loads the shipped {name!r} weights, which fix the architecture; "
                             f"drop the overrides {sorted(overrides) + (['num_classes'] if num_classes else [])}")
        checkpoint = shipped
    model = build_model(cfg)
    if checkpoint is not None:
        from parnet_cpu.models.checkpoint import load_checkpoint

        load_checkpoint(model, checkpoint)
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def clone(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)
