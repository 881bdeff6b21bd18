"""The zoos of ``benchmarks/zoo/sweep.py``: which models, how each is built, and how it is run on an example.

A builder is a no-argument callable returning an ``nn.Module`` or a :class:`Spec` (the module, candidate
example inputs and its classifier's names). :func:`torchvision_models` and :func:`timm_models` give
``{name: builder}`` for the two zoos (random weights, nothing downloaded); :func:`hf_models` gives Hugging Face
``transformers`` models built from their configs (:data:`HF_MODELS`). No zoo is needed to import this module.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Sequence

import torch
from torch import nn

__all__ = ["TIMM_MODELS", "Spec", "as_spec", "pick_input", "count_params", "logits_of", "default_classifier",
           "torchvision_models", "timm_models", "HF_MODELS", "hf_models", "HFClassifier", "tokens"]

# timm models swept by default (whichever exist in the installed timm): CNN families with concatenations,
# splits, grouped/depthwise convs, SE/SK attention, weight-standardised and norm-free convs, GroupNorm/LayerNorm
# + activation layers (ResNetV2 BiT, ``*_gn``), RepVGG-style branches, and transformers / hybrids (ViT, DeiT,
# BEiT, EVA-02: attention heads). torchvision's list is the whole of ``torchvision.models.list_models`` (its
# ViTs ``vit_b_16``, ``vit_b_32``, ``vit_l_16``, ``vit_l_32``, ``vit_h_14`` included).
TIMM_MODELS = [
    "resnet18", "resnet50", "resnext50_32x4d", "seresnext26d_32x4d", "ecaresnet26t", "res2net50_26w_4s",
    "skresnet18", "resnest14d", "densenet121", "vovnet39a", "dla34", "dpn68", "inception_v3", "legacy_xception",
    "xception41", "cspresnet50", "cspdarknet53", "nf_resnet26", "regnetx_002", "regnety_002", "regnetz_b16",
    "efficientnet_b0", "tf_efficientnet_b0", "mobilenetv2_100", "mobilenetv3_large_100", "mixnet_s",
    "ghostnet_100", "rexnet_100", "lcnet_100", "hrnet_w18_small", "selecsls42b", "repvgg_a0", "gernet_s",
    "resnetv2_50x1_bit", "resnetv2_50d_gn", "convnext_atto", "poolformer_s12", "mobilevit_xxs", "levit_128s",
    "coat_lite_tiny", "vit_tiny_patch16_224", "vit_small_patch16_224", "vit_base_patch16_224",
    "deit_tiny_patch16_224", "deit_small_patch16_224", "beit_base_patch16_224", "eva02_tiny_patch14_224",
]


@dataclass
class Spec:
    """What a builder may return instead of a bare module.

    ``inputs``: candidate example inputs, tried in order (the first whose forward runs is used; default one
    1x3x64x64 image; an integer tensor is token ids, and the comparison batch draws ids below its largest + 1).
    ``classifier``: names of the output layer(s) torch-pruning must not prune (default: the last ``nn.Linear``
    in module order, else the last conv). ``extra["tp_heads"]``: which torch-pruning example's head options
    to use (:data:`benchmarks.zoo.tp.HF_HEAD_OPTIONS`; default: found from the model).
    """

    model: nn.Module
    inputs: Sequence[torch.Tensor] = ()
    classifier: Optional[Sequence[str]] = None
    extra: dict = field(default_factory=dict)


def as_spec(built, default_size: int) -> Spec:
    """A builder's result as a :class:`Spec` (one ``default_size`` image when it names no input)."""
    spec = built if isinstance(built, Spec) else Spec(built)
    if not isinstance(spec.model, nn.Module):
        raise TypeError(f"the builder returned a {type(spec.model).__name__}, not an nn.Module")
    if not spec.inputs:
        spec.inputs = [torch.randn(1, 3, default_size, default_size, generator=torch.Generator().manual_seed(0))]
    return spec


def pick_input(model: nn.Module, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """The first candidate input whose forward runs (raise the last candidate's error if none does)."""
    err: Optional[BaseException] = None
    for x in inputs:
        try:
            with torch.no_grad():
                logits_of(model(x))
            return x
        except Exception as e:  # noqa: BLE001 - a model rejecting an input size: try the next one
            err = e
    assert err is not None
    raise err


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def logits_of(out) -> torch.Tensor:
    """The logits tensor of a classifier's output (a tensor, or the first tensor of a tuple/list/dict)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping):
        out = list(out.values())
    if isinstance(out, (tuple, list)) and out:
        return logits_of(out[0])
    if hasattr(out, "logits"):
        return logits_of(out.logits)
    raise TypeError(f"cannot find the logits in a {type(out).__name__} output")


def default_classifier(model: nn.Module) -> List[str]:
    """The last ``nn.Linear`` in module order, else the last conv (squeezenet's classifier)."""
    last_lin = last_conv = None
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            last_lin = name
        elif isinstance(m, nn.modules.conv._ConvNd):
            last_conv = name
    pick = last_lin if last_lin is not None else last_conv
    return [pick] if pick is not None else []


def _images(sizes: Sequence[int]) -> List[torch.Tensor]:
    out, seen = [], set()
    for s in sizes:
        if s not in seen:
            seen.add(s)
            out.append(torch.randn(1, 3, s, s, generator=torch.Generator().manual_seed(0)))
    return out


def _native_image(size) -> int:
    if isinstance(size, (tuple, list)):
        return int(size[-1])
    return int(size)


def torchvision_models(size: int, num_classes: int, only: Optional[Sequence[str]] = None) -> Dict[str, Callable]:
    import torchvision

    names = torchvision.models.list_models(module=torchvision.models)
    if only:
        names = [n for n in names if n in only]

    def builder(name):
        def build():
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
            native = 299 if name == "inception_v3" else 224
            return Spec(model, inputs=_images([size, 2 * size, native]))
        return build

    return {n: builder(n) for n in names}


def timm_models(size: int, num_classes: int, only: Optional[Sequence[str]] = None,
                names: Sequence[str] = TIMM_MODELS) -> Dict[str, Callable]:
    import timm

    available = set(timm.list_models())
    wanted = list(only) if only else list(names)
    out: Dict[str, Callable] = {}

    def builder(name):
        def build():
            if name not in available:
                raise ValueError(f"timm {timm.__version__} has no model {name!r}")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = timm.create_model(name, pretrained=False, num_classes=num_classes)
            cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
            native = _native_image(cfg.get("input_size", (3, 224, 224)))
            cls = model.get_classifier() if hasattr(model, "get_classifier") else None
            mods = {id(m): n for n, m in model.named_modules()}
            cls = list(cls) if isinstance(cls, (tuple, list)) else [cls]
            cls = [mods[id(m)] for m in cls if isinstance(m, nn.Module) and id(m) in mods
                   and any(True for _ in m.parameters())]
            return Spec(model, inputs=_images([size, 2 * size, native]), classifier=cls or None)
        return build

    for n in wanted:
        if only and n not in available:
            continue  # --only names a torchvision-only model
        out[n] = builder(n)
    return out


# Hugging Face models swept by ``--source hf``: ``{name: (config class, model class, config overrides, tp)}``,
# each the library's default (base) config unless overridden; tp: the torch-pruning example whose head options
# it gets (benchmarks/zoo/tp.py). Swin is tried at its native size only: a forward at a smaller size shrinks its
# layers' window_size for good (transformers 5.25), so that the native size fails after it.
HF_MODELS = {
    "hf_vit_base": ("ViTConfig", "ViTForImageClassification", {}, "hf_vit"),
    "hf_deit_base": ("DeiTConfig", "DeiTForImageClassification", {}, "hf_vit"),
    "hf_clip_vision_base32": ("CLIPVisionConfig", "CLIPVisionModel", {}, "hf_vit"),
    "hf_dinov2_base": ("Dinov2Config", "Dinov2ForImageClassification", {}, "hf_vit"),
    "hf_bert_base": ("BertConfig", "BertForSequenceClassification", {}, "hf_bert"),
    "hf_swin_tiny": ("SwinConfig", "SwinForImageClassification", {}, "hf_swin"),
}
_NATIVE_ONLY = {"SwinForImageClassification"}


class HFClassifier(nn.Module):
    """A headless Hugging Face vision model (``CLIPVisionModel``) with a linear classifier on its
    ``pooler_output``, as one fine-tunes it: the logits are the model's output, not its hidden states."""

    def __init__(self, backbone: nn.Module, width: int, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, pixel_values):
        return self.classifier(self.backbone(pixel_values).pooler_output)


def tokens(vocab: int, length: int = 16, seed: int = 0) -> torch.Tensor:
    """One sequence of ``length`` token ids below ``vocab`` whose largest is ``vocab - 1`` (the comparison
    batch draws ids below the example's largest + 1: the whole vocabulary)."""
    ids = torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(seed))
    ids[0, -1] = vocab - 1
    return ids


def hf_models(size: int, num_classes: int, only: Optional[Sequence[str]] = None,
              names: Optional[Sequence[str]] = None) -> Dict[str, Callable]:
    """``{name: builder}`` of :data:`HF_MODELS` (random weights from the config, nothing downloaded, eager
    attention as the config leaves it)."""
    import transformers

    wanted = [n for n in (names or HF_MODELS) if not only or n in only]

    def builder(name):
        cfg_name, cls_name, overrides, tp_heads = HF_MODELS[name]

        def build():
            cfg = getattr(transformers, cfg_name)(**overrides)
            headless = cls_name == "CLIPVisionModel"
            if not headless:
                cfg.num_labels = num_classes
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = getattr(transformers, cls_name)(cfg)
            if headless:
                model = HFClassifier(model, cfg.hidden_size, num_classes)
            extra = dict(tp_heads=tp_heads)
            if hasattr(cfg, "vocab_size") and not hasattr(cfg, "image_size"):
                return Spec(model, inputs=[tokens(cfg.vocab_size)], classifier=["classifier"], extra=extra)
            native = _native_image(getattr(cfg, "image_size", 224))
            sizes = [native] if cls_name in _NATIVE_ONLY else [size, 2 * size, native]
            return Spec(model, inputs=_images(sizes), classifier=["classifier"], extra=extra)
        return build

    return {n: builder(n) for n in wanted}
