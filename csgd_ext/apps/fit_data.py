"""The data of ``python -m csgd_ext fit``: an image folder (decoded with Pillow) or the embedded MNIST digits.

``DIR`` is a torchvision-style ``ImageFolder`` layout: ``DIR/train/<class>/*.png`` and ``DIR/val/<class>/...``,
or ``DIR/<class>/...`` split into train and val by the seed (20 % val per class). Every image is checked to
decode before anything is trained or written (the error names the file).

Randomness is a function of ``(seed, epoch, index)`` only: the training order of an epoch and each sample's
augmentation (a random resized crop to ``image_size`` and a horizontal flip; the digits get no flip) come from
generators seeded by those numbers, so an epoch redone after a crash is the same epoch. Validation images are
resized (shorter side ``image_size * 8 / 7``) and center-cropped. Tensors are normalized with ImageNet's mean
and std (RGB) or the digits' own.

Example::

    data = load_data("digits", image_size=32, seed=0)
    loader = data.train_loader(batch_size=64, epoch=0)          # the order of epoch 0 for seed 0
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from csgd_ext.apps.args import CLIError

__all__ = ["FitData", "load_data", "epoch_sampler", "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")
_RGB_MEAN, _RGB_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
_DIGITS_MEAN, _DIGITS_STD = (0.1307,), (0.3081,)


def _generator(*key: int) -> torch.Generator:
    h = 0
    for k in key:
        h = (h * 1_000_003 + int(k) + 1) % (2 ** 62)
    return torch.Generator().manual_seed(h)


def _resized_crop(img: torch.Tensor, size: int, gen: Optional[torch.Generator]) -> torch.Tensor:
    """``(C, H, W)`` float image -> ``(C, size, size)``: a random resized crop (area 35-100 %, aspect 3/4-4/3)
    with ``gen``, else resize of the shorter side to ``size * 8 / 7`` and a center crop."""
    c, h, w = img.shape
    if gen is not None:
        area = h * w
        for _ in range(10):
            target = area * (0.35 + 0.65 * torch.rand((), generator=gen).item())
            u = torch.rand((), generator=gen).item()
            ratio = math.exp(math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * u)
            cw, ch = int(round(math.sqrt(target * ratio))), int(round(math.sqrt(target / ratio)))
            if 0 < cw <= w and 0 < ch <= h:
                top = int(torch.randint(0, h - ch + 1, (), generator=gen))
                left = int(torch.randint(0, w - cw + 1, (), generator=gen))
                img = img[:, top:top + ch, left:left + cw]
                break
        return F.interpolate(img[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]
    short = max(1, round(size * 8 / 7))
    scale = short / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    img = F.interpolate(img[None], size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)[0]
    top, left = (nh - size) // 2, (nw - size) // 2
    return img[:, top:top + size, left:left + size]


class _Images(Dataset):
    """Samples ``(image tensor, label)``; ``train``: augmented with generators seeded by (seed, epoch, index)."""

    def __init__(self, items, size: int, mean, std, train: bool, seed: int, flip: bool):
        self.items, self.size, self.train, self.seed, self.flip = items, size, train, seed, flip
        self.mean = torch.tensor(mean).view(-1, 1, 1)
        self.std = torch.tensor(std).view(-1, 1, 1)
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.items)

    def _image(self, i: int) -> torch.Tensor:
        raise NotImplementedError

    def __getitem__(self, i: int):
        img = self._image(i)
        gen = _generator(self.seed, self.epoch, i) if self.train else None
        img = _resized_crop(img, self.size, gen)
        if gen is not None and self.flip and torch.rand((), generator=gen).item() < 0.5:
            img = img.flip(-1)
        return (img - self.mean) / self.std, self.items[i][1]


class _FolderImages(_Images):
    def _image(self, i: int) -> torch.Tensor:
        from PIL import Image

        with Image.open(self.items[i][0]) as im:
            rgb = im.convert("RGB")
            t = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8)
            return t.view(rgb.size[1], rgb.size[0], 3).permute(2, 0, 1).float() / 255.0


class _TensorImages(_Images):
    def _image(self, i: int) -> torch.Tensor:
        return self.items[i][0]


def epoch_sampler(n: int, seed: int, epoch: int, rank: int = 0, world: int = 1) -> DistributedSampler:
    """Epoch ``epoch``'s order: a ``DistributedSampler`` over ``n`` samples whose permutation is drawn from
    ``(seed, epoch)`` only, so a redone epoch has the same order. Rank ``rank`` of ``world`` takes every
    ``world``-th index of that order, so with local batches of ``batch / world`` the ranks' batches together are
    exactly the global batches of a single process (``world=1``) with batch ``batch``."""
    sampler = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True,
                                 seed=(seed * 1_000_003) % 2 ** 62, drop_last=True)
    sampler.set_epoch(epoch)
    return sampler


@dataclass
class FitData:
    train: _Images
    val: _Images
    classes: List[str]
    channels: int
    description: str
    workers: int = 0
    image_size: int = 224
    size_reason: str = ""

    def train_loader(self, batch_size: int, epoch: int, rank: int = 0, world: int = 1) -> DataLoader:
        """Epoch ``epoch``'s batches of ``batch_size`` (global: each of ``world`` ranks gets its share)."""
        self.train.epoch = epoch
        sampler = epoch_sampler(len(self.train), self.train.seed, epoch, rank, world)
        return DataLoader(self.train, batch_size=batch_size // world, sampler=sampler, num_workers=self.workers,
                          drop_last=len(self.train) > batch_size)

    def val_loader(self, batch_size: int) -> DataLoader:
        return DataLoader(self.val, batch_size=batch_size, shuffle=False, num_workers=self.workers)


def _class_dirs(root: str) -> List[str]:
    return sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))


def _files(root: str, classes: Sequence[str]) -> List[Tuple[str, int]]:
    out = []
    for label, c in enumerate(classes):
        for dirpath, _, names in sorted(os.walk(os.path.join(root, c))):
            out += [(os.path.join(dirpath, n), label) for n in sorted(names) if n.lower().endswith(IMAGE_EXTENSIONS)]
    return out


def _check_images(items) -> set:
    """Every image decodes (else the error names it); returns the set of their ``(width, height)``."""
    from PIL import Image, UnidentifiedImageError

    sizes = set()
    for path, _ in items:
        try:
            with Image.open(path) as im:
                sizes.add(im.size)
                im.verify()
        except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
            raise CLIError(f"--data: cannot decode image {path!r}: {type(e).__name__}: {e}") from None
    return sizes


def _folder(root: str, size: Optional[int], seed: int) -> FitData:
    if not os.path.isdir(root):
        raise CLIError(f"--data: no such directory {root!r} (an ImageFolder layout, or 'digits')")
    split = os.path.isdir(os.path.join(root, "train")) and os.path.isdir(os.path.join(root, "val"))
    tr_root, va_root = (os.path.join(root, "train"), os.path.join(root, "val")) if split else (root, root)
    classes = _class_dirs(tr_root)
    if not classes:
        raise CLIError(f"--data: {tr_root!r} has no class folders (expected {tr_root}/<class>/<image>)")
    if len(classes) == 1:
        raise CLIError(f"--data: {tr_root!r} has one class folder ({classes[0]!r}): a classifier needs at least two "
                       f"classes, one folder each")
    if split and _class_dirs(va_root) != classes:
        raise CLIError(f"--data: the class folders of {va_root!r} differ from those of {tr_root!r}")
    train = _files(tr_root, classes)
    if not train:
        raise CLIError(f"--data: no images ({', '.join(IMAGE_EXTENSIONS)}) under {tr_root!r}")
    if split:
        val = _files(va_root, classes)
    else:  # 20 % of each class, drawn by the seed
        gen = _generator(seed, -2)
        order = torch.randperm(len(train), generator=gen).tolist()
        by_class: dict = {}
        for i in order:
            by_class.setdefault(train[i][1], []).append(i)
        val_idx = {i for idx in by_class.values() for i in idx[:max(1, len(idx) // 5)] if len(idx) > 1}
        val = [train[i] for i in sorted(val_idx)]
        train = [t for i, t in enumerate(train) if i not in val_idx]
    if not val:
        raise CLIError(f"--data: no validation images in {va_root!r}")
    sizes = _check_images(train + val)
    if size is not None:
        reason = "--image-size"
    elif len(sizes) == 1:
        (w, h), = sizes
        size, reason = min(w, h), f"the images' own: all are {w}x{h}" + ("" if w == h else ", the shorter side")
    else:
        size, reason = 224, f"the default: the images come in {len(sizes)} sizes; --image-size sets one"
    desc = f"{root} ({len(train)} train / {len(val)} val images, {len(classes)} classes" + \
           ("" if split else ", val split by the seed") + ")"
    return FitData(_FolderImages(train, size, _RGB_MEAN, _RGB_STD, True, seed, flip=True),
                   _FolderImages(val, size, _RGB_MEAN, _RGB_STD, False, seed, flip=False), classes, 3, desc,
                   image_size=size, size_reason=reason)


def _digits(size: Optional[int], seed: int) -> FitData:
    from csgd_ext.apps import data as digits

    s = digits.mnist_split(0.2, seed)
    # back to [0, 1] images: the augmentation works on pixels, then our own normalization
    x_tr, x_te = s.x_train * s.std + s.mean, s.x_test * s.std + s.mean
    train = [(x_tr[i], int(s.y_train[i])) for i in range(len(x_tr))]
    val = [(x_te[i], int(s.y_test[i])) for i in range(len(x_te))]
    classes = [str(i) for i in range(digits.NUM_CLASSES)]
    desc = f"digits (embedded MNIST: {len(train)} train / {len(val)} val, 10 classes)"
    size, reason = (size, "--image-size") if size is not None else (28, "the digits' own")
    return FitData(_TensorImages(train, size, _DIGITS_MEAN, _DIGITS_STD, True, seed, flip=False),
                   _TensorImages(val, size, _DIGITS_MEAN, _DIGITS_STD, False, seed, flip=False), classes, 1, desc,
                   image_size=size, size_reason=reason)


def load_data(spec: str, image_size: Optional[int], seed: int, workers: int = 0) -> FitData:
    """``"digits"`` or an image folder (see the module docstring); :class:`CLIError` for anything unusable.
    ``image_size`` None: the images' own size when they all share one (the shorter side when they are not
    square), 28 for the digits, else 224; ``data.image_size`` and ``data.size_reason`` say which."""
    data = _digits(image_size, seed) if spec == "digits" else _folder(spec, image_size, seed)
    data.workers = workers
    return data
