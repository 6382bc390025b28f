"""Images, aligned view pairs and resumable per-rank batches for the trainer.

PCD's positive for a student pixel is the teacher pixel *at the same place*. The official code
pairs pixels of two independent random crops by grid index, so a "positive" often shows another
part of the image. Here both views of an image share one geometric transform (crop, resize, flip)
and differ only photometrically. Pixel ``(y, x)`` of view 1 and of view 2 then show the same
place, so the symmetric loss compares what it should.

Every random choice of a sample is drawn from a generator seeded by ``(seed, epoch, index)``.
This makes the data independent of the worker count, of the rank layout and of interruptions, so a
resumed run sees exactly the batches an uninterrupted one would.
"""
import math
import os
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset, DistributedSampler

from pcd_kernels.train.errors import TrainError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)



def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    state = np.random.SeedSequence([seed, epoch, index]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed((int(state[0]) & 0x7FFFFFFF) << 32 | int(state[1]))


class ImageFolder(Dataset):
    """Every image file under ``root`` (recursively, sorted), as (3, H, W) float tensors in [0, 1],
    resized so that the shorter side is ``load_size``. Labels and sub-folder names are ignored."""

    def __init__(self, root: str, load_size: int):
        if not os.path.isdir(root):
            raise TrainError(f"--data: {root!r} is not a directory")
        self.root, self.load_size = root, load_size
        self.paths = sorted(os.path.join(folder, name) for folder, _, names in os.walk(root, followlinks=True)
                            for name in names if name.lower().endswith(IMAGE_EXTENSIONS))
        if not self.paths:
            raise TrainError(f"--data: no images ({', '.join(IMAGE_EXTENSIONS)}) under {root!r}")
        try:
            import PIL.Image  # noqa: F401
        except ImportError as error:
            raise TrainError("reading images from --data needs Pillow: pip install pillow") from error

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> Tensor:
        from PIL import Image

        path = self.paths[index]
        try:
            with Image.open(path) as image:
                image = image.convert("RGB")
                scale = self.load_size / min(image.size)
                if scale < 1:
                    image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                                         Image.BILINEAR)
                array = np.asarray(image, dtype=np.uint8).copy()
        except OSError as error:
            raise TrainError(f"cannot read image {path!r}: {error}") from error
        return torch.from_numpy(array).permute(2, 0, 1).float().div_(255)


@dataclass
class Augmentation:
    """The views' transform: one crop/flip shared by both views, then per-view colour changes."""
    size: int
    crop_scale: Tuple[float, float] = (0.2, 1.0)
    crop_ratio: Tuple[float, float] = (3 / 4, 4 / 3)
    hflip: bool = True
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    grayscale: float = 0.2
    blur: float = 0.5
    noise: float = 0.0
    mean: Optional[Sequence[float]] = IMAGENET_MEAN
    std: Optional[Sequence[float]] = IMAGENET_STD

    def crop_box(self, height: int, width: int, g: torch.Generator) -> Tuple[int, int, int, int]:
        """(top, left, h, w) of a random crop with area share in ``crop_scale`` and aspect ratio in
        ``crop_ratio`` (log-uniform), falling back to the whole image (torchvision's rule)."""
        area = height * width
        log_ratio = (math.log(self.crop_ratio[0]), math.log(self.crop_ratio[1]))
        for _ in range(10):
            target = area * _uniform(g, *self.crop_scale)
            ratio = math.exp(_uniform(g, *log_ratio))
            w, h = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
            if 0 < w <= width and 0 < h <= height:
                top = int(torch.randint(0, height - h + 1, (1,), generator=g))
                left = int(torch.randint(0, width - w + 1, (1,), generator=g))
                return top, left, h, w
        return 0, 0, height, width

    def geometry(self, image: Tensor, g: torch.Generator) -> Tensor:
        top, left, h, w = self.crop_box(image.shape[1], image.shape[2], g)
        crop = image[None, :, top:top + h, left:left + w]
        out = F.interpolate(crop, size=(self.size, self.size), mode="bilinear", align_corners=False,
                            antialias=h > self.size or w > self.size)[0]
        if self.hflip and _uniform(g, 0, 1) < 0.5:
            out = out.flip(-1)
        return out

    def photometric(self, view: Tensor, g: torch.Generator) -> Tensor:
        gray = (view * view.new_tensor([0.299, 0.587, 0.114])[:, None, None]).sum(0, keepdim=True) \
            if view.shape[0] == 3 else view.mean(0, keepdim=True)
        if self.brightness:
            view = view * _uniform(g, 1 - self.brightness, 1 + self.brightness)
        if self.contrast:
            c = _uniform(g, 1 - self.contrast, 1 + self.contrast)
            view = (view - gray.mean()) * c + gray.mean()
        if self.saturation and view.shape[0] == 3:
            s = _uniform(g, 1 - self.saturation, 1 + self.saturation)
            view = (view - gray) * s + gray
        if self.grayscale and _uniform(g, 0, 1) < self.grayscale:
            view = gray.expand_as(view).clone()
        if self.blur and _uniform(g, 0, 1) < self.blur:
            view = _gaussian_blur(view, sigma=_uniform(g, 0.1, 2.0) * self.size / 224)
        if self.noise:
            view = view + self.noise * torch.randn(view.shape, generator=g)
        view = view.clamp(0, 1)
        if self.mean is not None:
            view = (view - view.new_tensor(self.mean)[:, None, None]) / view.new_tensor(self.std)[:, None, None]
        return view


def _uniform(g: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=g))


def _gaussian_blur(view: Tensor, sigma: float) -> Tensor:
    radius = max(1, math.ceil(2 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=view.dtype)
    kernel = torch.exp(-0.5 * (x / max(sigma, 1e-3)) ** 2)
    kernel = kernel / kernel.sum()
    channels = view.shape[0]
    padded = F.pad(view[None], (radius, radius, radius, radius), mode="replicate")
    out = F.conv2d(padded, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
    return F.conv2d(out, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)[0]


class ViewPairs(Dataset):
    """Two geometrically aligned views of each image of ``images``, indexed by (epoch, index)."""

    def __init__(self, images: Dataset, augmentation: Augmentation, seed: int):
        self.images, self.augmentation, self.seed = images, augmentation, seed

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: Tuple[int, int]) -> Tuple[Tensor, Tensor]:
        epoch, index = key
        g = sample_generator(self.seed, epoch, index)
        shared = self.augmentation.geometry(self.images[index], g)
        return self.augmentation.photometric(shared, g), self.augmentation.photometric(shared, g)


class StepBatches:
    """The (epoch, index) keys of this rank's batches from ``start_step`` to ``total_steps``.

    Each epoch is ``DistributedSampler``'s shuffled, rank-disjoint share of the data (``drop_last``),
    cut into full batches; a resumed run starts mid-epoch at exactly the batch it stopped before."""

    def __init__(self, num_images: int, batch_size: int, seed: int, rank: int, world_size: int,
                 start_step: int, total_steps: int):
        self.steps_per_epoch = steps_per_epoch(num_images, batch_size, world_size)
        self.num_images, self.batch_size, self.seed = num_images, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.start_step, self.total_steps = start_step, total_steps

    def __len__(self) -> int:
        return max(self.total_steps - self.start_step, 0)

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        step = self.start_step
        while step < self.total_steps:
            epoch, offset = divmod(step, self.steps_per_epoch)
            sampler = DistributedSampler(range(self.num_images), num_replicas=self.world_size, rank=self.rank,
                                         shuffle=True, seed=self.seed, drop_last=True)
            sampler.set_epoch(epoch)
            indices = list(sampler)
            for b in range(offset, self.steps_per_epoch):
                if step >= self.total_steps:
                    return
                yield [(epoch, i) for i in indices[b * self.batch_size:(b + 1) * self.batch_size]]
                step += 1


def steps_per_epoch(num_images: int, batch_size: int, world_size: int) -> int:
    steps = (num_images // world_size) // batch_size
    if steps == 0:
        raise TrainError(f"{num_images} images are fewer than one batch of {batch_size} per process "
                        f"on {world_size} process(es): lower --batch-size or add images")
    return steps
