"""The toy world of the bundled model: one flat shape on a flat background, with its caption.

    "a red circle on a white background"

Images are 64x64 RGB, drawn on the fly (there is no dataset to download): one shape (circle,
square or upright triangle) in one colour, at a random position and size, on a background of a
different colour. `judge` reads the three facts back from pixel statistics alone, which is how
the tests grade images the model generates:
  - background: the median colour of the 1-pixel border (the shape never touches it);
  - the shape is the largest connected blob of pixels far from the background colour (a stray
    speck elsewhere is not the shape);
  - shape colour: the mean colour of the blob's pixels;
  - shape: how much of the blob's bounding box it fills (square 1, circle pi/4, triangle 1/2).
"""

from __future__ import annotations

import random
from typing import NamedTuple

import torch
import torch.nn.functional as F

SIZE = 64
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 60, 220),
    "yellow": (240, 220, 40),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
SHAPES = ("circle", "square", "triangle")
# bounding-box fill ratio of each shape, drawn exactly (judge picks the nearest)
FILL_RATIO = {"circle": torch.pi / 4, "square": 1.0, "triangle": 0.5}
MIN_EXTENT, MAX_EXTENT = 20, 44  # the shape's width = height, in pixels
MARGIN = 3  # keep the border pure background, so judge can read it


class Scene(NamedTuple):
    shape: str
    color: str
    background: str

    @property
    def caption(self) -> str:
        return f"a {self.color} {self.shape} on a {self.background} background"


def random_scene(rng: random.Random) -> Scene:
    color, background = rng.sample(list(COLORS), 2)  # two different colours
    return Scene(rng.choice(SHAPES), color, background)


def parse_caption(caption: str) -> Scene:
    """ "a red circle on a white background" -> Scene("circle", "red", "white")."""
    words = caption.lower().split()
    if (
        len(words) != 7
        or words[0] != "a"
        or words[3:5] != ["on", "a"]
        or words[6] != "background"
        or words[1] not in COLORS
        or words[2] not in SHAPES
        or words[5] not in COLORS
    ):
        raise ValueError(
            f"{caption!r} is not 'a <colour> <shape> on a <colour> background' with colours "
            f"{', '.join(COLORS)} and shapes {', '.join(SHAPES)}"
        )
    return Scene(words[2], words[1], words[5])


def render(scenes: list[Scene], rng: random.Random) -> torch.Tensor:
    """Draw the scenes at random positions and sizes: uint8 images (N, 3, SIZE, SIZE)."""
    n = len(scenes)
    extent = torch.tensor([rng.uniform(MIN_EXTENT, MAX_EXTENT) for _ in range(n)])
    # the shape's bounding box [x0, x0 + extent) x [y0, y0 + extent), clear of the border
    x0 = torch.tensor([rng.uniform(MARGIN, SIZE - MARGIN - e) for e in extent.tolist()])
    y0 = torch.tensor([rng.uniform(MARGIN, SIZE - MARGIN - e) for e in extent.tolist()])
    e, x0, y0 = (t.view(n, 1, 1) for t in (extent, x0, y0))
    centers = torch.arange(SIZE, dtype=torch.float32) + 0.5  # pixel centres
    x, y = centers.view(1, 1, SIZE), centers.view(1, SIZE, 1)
    u, v = (x - x0) / e, (y - y0) / e  # position inside the box, 0..1
    inside_box = (u >= 0) & (u < 1) & (v >= 0) & (v < 1)
    masks = {
        "square": inside_box,
        "circle": (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25,
        "triangle": inside_box & ((u - 0.5).abs() * 2 <= v),  # apex at the top, base at the bottom
    }
    images = torch.empty(n, 3, SIZE, SIZE, dtype=torch.uint8)
    for i, s in enumerate(scenes):
        mask = masks[s.shape][i]
        images[i] = torch.where(
            mask, torch.tensor(COLORS[s.color]).view(3, 1, 1), torch.tensor(COLORS[s.background]).view(3, 1, 1)
        )
    return images


def sample_batch(n: int, rng: random.Random) -> tuple[torch.Tensor, list[str]]:
    """n random scenes: images in [-1, 1] (N, 3, 64, 64) float32 and their captions."""
    scenes = [random_scene(rng) for _ in range(n)]
    return render(scenes, rng).float() / 127.5 - 1, [s.caption for s in scenes]


def _nearest_color(rgb: torch.Tensor) -> str:
    palette = torch.tensor(list(COLORS.values()), dtype=torch.float32)
    return list(COLORS)[int(((palette - rgb.float()) ** 2).sum(-1).argmin())]


def largest_blob(mask: torch.Tensor) -> torch.Tensor:
    """The largest 8-connected component of a boolean (H, W) mask."""
    h, w = mask.shape
    ids = torch.arange(1, h * w + 1, dtype=torch.float32).view(1, 1, h, w) * mask
    while True:  # every pixel takes the largest id around it until each blob has one id
        grown = F.max_pool2d(ids, 3, stride=1, padding=1) * mask
        if torch.equal(grown, ids):
            break
        ids = grown
    labels, counts = ids[ids > 0].unique(return_counts=True)
    return ids[0, 0] == labels[counts.argmax()] if len(labels) else mask


def judge(image: torch.Tensor) -> Scene:
    """Read (shape, colour, background) off a uint8 (3, H, W) image by pixel statistics."""
    if image.dim() != 3 or image.shape[0] != 3:
        raise ValueError(f"judge wants one (3, H, W) image, got shape {tuple(image.shape)}")
    img = image.float()
    border = torch.cat([img[:, 0], img[:, -1], img[:, :, 0], img[:, :, -1]], dim=1)  # (3, 4W)
    bg_rgb = border.median(dim=1).values
    far = ((img - bg_rgb.view(3, 1, 1)) ** 2).sum(0).sqrt() > 80  # clearly not background
    if far.sum() < 16:
        return Scene("none", "none", _nearest_color(bg_rgb))
    far = largest_blob(far)
    color = _nearest_color(img[:, far].mean(dim=1))
    rows, cols = far.any(1).nonzero(), far.any(0).nonzero()
    box = far[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    fill = box.float().mean().item()
    shape = min(FILL_RATIO, key=lambda s: abs(FILL_RATIO[s] - fill))
    return Scene(shape, color, _nearest_color(bg_rgb))
