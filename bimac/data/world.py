"""The embedded world: procedurally rendered scenes with English and Bengali captions.

It stands in for CC15M/COCO on machines with no data and no GPU. A scene is one or two *groups*
of identical objects (same shape, colour, size, texture), 1-4 objects in all; with two groups the
second is placed entirely to the left of / right of / above / below the first, so every caption
("two red circles to the left of a blue square") is true of the pixels. Everything is a pure
function of ``(seed, split, index)``.

Bengali captions translate the English ones template by template: numeral + classifier
(একটি, দুটি, তিনটি, চারটি), then size and colour adjectives, then the noun in the singular
(Bengali does not pluralise a counted noun), genitive ``-এর``/``-র`` on the reference noun phrase
and a postposition for the relation (বাম দিকে, ডান দিকে, উপরে, নিচে).
"""

from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass, field, replace

import numpy as np
from PIL import Image, ImageDraw

# --- lexicon -------------------------------------------------------------------------------------
# name -> (RGB, Bengali adjective)
COLOURS: dict[str, tuple[tuple[int, int, int], str]] = {
    "red": ((220, 30, 30), "লাল"),
    "green": ((30, 160, 50), "সবুজ"),
    "blue": ((30, 70, 220), "নীল"),
    "yellow": ((240, 220, 30), "হলুদ"),
    "orange": ((245, 140, 20), "কমলা"),
    "purple": ((130, 40, 170), "বেগুনি"),
    "pink": ((245, 130, 190), "গোলাপি"),
    "brown": ((120, 70, 30), "বাদামি"),
    "black": ((15, 15, 15), "কালো"),
    "white": ((250, 250, 250), "সাদা"),
}
# name -> (English plural, Bengali noun)
SHAPES: dict[str, tuple[str, str]] = {
    "circle": ("circles", "বৃত্ত"),
    "square": ("squares", "বর্গক্ষেত্র"),
    "triangle": ("triangles", "ত্রিভুজ"),
    "star": ("stars", "তারা"),
    "pentagon": ("pentagons", "পঞ্চভুজ"),
    "hexagon": ("hexagons", "ষড়ভুজ"),
    "diamond": ("diamonds", "রম্বস"),
    "ellipse": ("ellipses", "উপবৃত্ত"),
    "cross": ("crosses", "ক্রস"),
    "crescent": ("crescents", "অর্ধচন্দ্র"),
}
# name -> (side as a fraction of the canvas, Bengali adjective)
SIZES: dict[str, tuple[float, str]] = {
    "small": (0.16, "ছোট"),
    "medium": (0.23, "মাঝারি"),
    "large": (0.30, "বড়"),
}
NUMBERS_EN = {1: "a", 2: "two", 3: "three", 4: "four"}
NUMBERS_BN = {1: "একটি", 2: "দুটি", 3: "তিনটি", 4: "চারটি"}
# relation -> (English phrase, inverse relation, Bengali postposition)
RELATIONS: dict[str, tuple[str, str, str]] = {
    "left": ("to the left of", "right", "বাম দিকে"),
    "right": ("to the right of", "left", "ডান দিকে"),
    "above": ("above", "below", "উপরে"),
    "below": ("below", "above", "নিচে"),
}
TEXTURES = ("solid", "stripes", "dots", "checker")
BACKGROUNDS: tuple[tuple[int, int, int], ...] = (
    (200, 200, 195),
    (175, 190, 205),
    (215, 205, 180),
    (150, 150, 150),
    (185, 205, 185),
    (120, 125, 140),
)
SPLITS = ("train", "val", "retrieval", "cls_shape", "cls_colour_shape", "probe")
# default: the scenes above. binding: every train/val/retrieval scene has two groups, and scenes
# come in clusters of BINDING_CLUSTER that share both colours, both shapes and both counts and
# differ only in which colour goes with which shape and in the relation (Winoground-style hard
# negatives inside every retrieval split, so colour or count alone cannot retrieve a scene).
# Its objects are ones a 64 px tower with 8 px patches can tell apart in a few hundred steps
# (README, "World, budget, evaluation of BiMAC's tables"): five shapes that differ in outline,
# solid, medium or large, one per group, each on whole cells of an 8 x 8 grid (the patches).
# Its classification splits draw from the same shapes; the probe split is the default's.
VARIANTS = ("default", "binding")
BINDING_CLUSTER = 4
_BINDING_SPLITS = ("train", "val", "retrieval")
BINDING_SHAPES = ("circle", "square", "triangle", "star", "cross")
BINDING_SIZES = ("medium", "large")
BINDING_GRID = 8  # cells per image side: the patch grid of the tables' tower (64 px / 8 px)
# Well-separated base seeds so splits never share a scene.
_SPLIT_SALT = {s: i * 1_000_003 for i, s in enumerate(SPLITS)}
_BN_VOWEL_SIGNS = set("ািীুূৃেৈোৌ")


def bn_genitive(word: str) -> str:
    """Bengali genitive: ``-র`` after a vowel (sign), ``-এর`` (written ``ের``) after a consonant."""
    return word + ("র" if word[-1] in _BN_VOWEL_SIGNS or "অ" <= word[-1] <= "ঔ" else "ের")


def class_names(split: str, variant: str = "default") -> list[str]:
    """Label names of a zero-shot classification split (index = ``label_index`` in the JSON)."""
    shapes = list(BINDING_SHAPES if variant == "binding" else SHAPES)
    if split == "cls_shape":
        return shapes
    if split == "cls_colour_shape":
        return [f"{c} {s}" for c in COLOURS for s in shapes]
    raise ValueError(f"{split!r} is not a classification split (cls_shape, cls_colour_shape)")


# --- scenes --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Group:
    """Objects that share every attribute; captions describe a group as one noun phrase."""

    shape: str
    colour: str
    size: str
    count: int
    texture: str = "solid"


@dataclass
class Scene:
    groups: list[Group]
    relation: str | None  # groups[0] <relation> groups[1]
    boxes: list[list[tuple[float, float, float, float]]] = field(default_factory=list)
    background: tuple[int, int, int] = BACKGROUNDS[0]


def _rng(seed: int, split: str, index: int, salt: str = "") -> random.Random:
    return random.Random(f"{seed}/{_SPLIT_SALT[split]}/{index}/{salt}")


def sample_groups(rng: random.Random, n_groups: int | None = None) -> list[Group]:
    """1-2 groups, 1-4 objects in all, the groups differing in (colour, shape)."""
    n_groups = n_groups or rng.choice((1, 2, 2))
    groups: list[Group] = []
    while len(groups) < n_groups:
        left = 4 - sum(g.count for g in groups) - (n_groups - len(groups) - 1)
        g = Group(
            shape=rng.choice(list(SHAPES)),
            colour=rng.choice(list(COLOURS)),
            size=rng.choice(list(SIZES)),
            count=rng.randint(1, min(3, left)),
            texture=rng.choice(TEXTURES),
        )
        if all((g.shape, g.colour) != (h.shape, h.colour) for h in groups):
            groups.append(g)
    return groups


def _region(relation: str | None, which: int) -> tuple[float, float, float, float]:
    """Fractional region a group must lie in so the relation holds with a gap between halves."""
    if relation is None:
        return (0.0, 0.0, 1.0, 1.0)
    first = {"left": (0, 0, 0.47, 1), "right": (0.53, 0, 1, 1)}
    first |= {"above": (0, 0, 1, 0.47), "below": (0, 0.53, 1, 1)}
    inv = RELATIONS[relation][1]
    return first[relation] if which == 0 else first[inv]


def layout(
    groups: list[Group], relation: str | None, size: int, rng: random.Random, grid: int = 0
):
    """Non-overlapping boxes for every object, each group inside its relation's half.

    A group that does not fit after some tries is shrunk one size class (its label follows).
    ``grid`` > 0: every object fills whole cells of a ``grid`` x ``grid`` grid over the image,
    less a 1 px margin (its side rounded up to whole cells), placed on cell boundaries.
    """
    boxes: list[list[tuple[float, float, float, float]]] = []
    placed: list[tuple[float, float, float, float]] = []
    out_groups = []
    for gi, g in enumerate(groups):
        rx0, ry0, rx1, ry1 = (v * size for v in _region(relation, gi))
        size_names = list(SIZES)
        for level in range(size_names.index(g.size), -1, -1):
            g = replace(g, size=size_names[level])
            side = SIZES[g.size][0] * size
            w = side * (1.5 if g.shape == "ellipse" else 1.0)
            h = side * (0.7 if g.shape == "ellipse" else 1.0)
            if grid:
                cell = size / grid
                w = h = cell * math.ceil(side / cell) - 2
                xs = [c * cell + 1 for c in range(grid) if rx0 <= c * cell and (c * cell) + w + 1 <= rx1]  # fmt: skip
                ys = [c * cell + 1 for c in range(grid) if ry0 <= c * cell and (c * cell) + h + 1 <= ry1]  # fmt: skip
                if not xs or not ys:
                    continue
            if w > rx1 - rx0 - 2 or h > ry1 - ry0 - 2:
                continue
            mine: list[tuple[float, float, float, float]] = []
            for _ in range(60 * g.count):
                if grid:
                    x0, y0 = rng.choice(xs), rng.choice(ys)
                else:
                    x0 = rng.uniform(rx0 + 1, rx1 - w - 1)
                    y0 = rng.uniform(ry0 + 1, ry1 - h - 1)
                box = (x0, y0, x0 + w, y0 + h)
                if all(_apart(box, b, 2) for b in placed + mine):
                    mine.append(box)
                    if len(mine) == g.count:
                        break
            if len(mine) == g.count:
                break
        else:  # even the smallest size does not fit: drop to one object
            g = replace(g, count=1, size=size_names[0])
            side = SIZES[g.size][0] * size
            mine = [(rx0 + 1, ry0 + 1, rx0 + 1 + side, ry0 + 1 + side)]
        placed += mine
        boxes.append(mine)
        out_groups.append(g)
    return out_groups, boxes


def _apart(a, b, gap: float) -> bool:
    return a[2] + gap <= b[0] or b[2] + gap <= a[0] or a[3] + gap <= b[1] or b[3] + gap <= a[1]


def _binding_groups(seed: int, split: str, index: int, rng: random.Random):
    """Groups and relation of a ``binding`` scene: its cluster (``index // BINDING_CLUSTER``) fixes
    two colours and two shapes (one object each); the member picks one of the cluster's distinct
    (colour-to-shape binding, relation) configurations, drawn without replacement."""
    cluster = _rng(seed, split, index // BINDING_CLUSTER, "binding")
    shapes = cluster.sample(BINDING_SHAPES, 2)
    colours = cluster.sample(list(COLOURS), 2)
    configs = cluster.sample(range(2 * len(RELATIONS)), BINDING_CLUSTER)  # binding x relation
    config = configs[index % BINDING_CLUSTER]
    if config // len(RELATIONS):  # the other binding: colours swap between the shapes
        colours = colours[::-1]
    groups = [Group(s, c, rng.choice(BINDING_SIZES), 1) for s, c in zip(shapes, colours)]
    return groups, list(RELATIONS)[config % len(RELATIONS)]


def make_scene(
    seed: int, split: str, index: int, size: int = 64, variant: str = "default"
) -> Scene:
    """The scene of sample ``index`` of ``split``: groups, relation, boxes, background."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown world variant {variant!r}; one of {VARIANTS}")
    rng = _rng(seed, split, index)
    if variant == "binding" and split in _BINDING_SPLITS:
        groups, relation = _binding_groups(seed, split, index, rng)
        groups, boxes = layout(groups, relation, size, rng, BINDING_GRID)
        return Scene(groups, relation, boxes, _contrasting_background(groups, rng))
    if variant == "binding" and split in ("cls_shape", "cls_colour_shape"):
        group = Group(rng.choice(BINDING_SHAPES), rng.choice(list(COLOURS)), rng.choice(BINDING_SIZES), 1)  # fmt: skip
        groups, boxes = layout([group], None, size, rng, BINDING_GRID)
        return Scene(groups, None, boxes, _contrasting_background(groups, rng))
    if split in ("cls_shape", "cls_colour_shape"):
        groups = [replace(sample_groups(rng, 1)[0], count=1, size=rng.choice(["medium", "large"]))]
    elif split == "probe":  # colours and shapes both differ, so either swap changes the image
        groups = sample_groups(rng, 2)
        while groups[0].colour == groups[1].colour or groups[0].shape == groups[1].shape:
            groups = sample_groups(rng, 2)
        groups = [replace(g, count=1) for g in groups]
    else:
        groups = sample_groups(rng)
    relation = rng.choice(list(RELATIONS)) if len(groups) == 2 else None
    groups, boxes = layout(groups, relation, size, rng)
    bg = _contrasting_background(groups, rng)
    return Scene(groups, relation, boxes, bg)


def _contrasting_background(groups: list[Group], rng: random.Random) -> tuple[int, int, int]:
    def dist(a, b):
        return math.dist(a, b)

    ok = [bg for bg in BACKGROUNDS if all(dist(bg, COLOURS[g.colour][0]) > 90 for g in groups)]
    return rng.choice(ok or list(BACKGROUNDS))


def companion(scene: Scene, size: int, rng: random.Random) -> Scene:
    """The same groups and relation in a new layout, texture and background (captions still hold)."""
    groups = [replace(g, texture=rng.choice(TEXTURES)) for g in scene.groups]
    groups, boxes = layout(groups, scene.relation, size, rng)
    return Scene(groups, scene.relation, boxes, _contrasting_background(groups, rng))


# --- rendering -----------------------------------------------------------------------------------
def _polygon(shape: str, box) -> list[tuple[float, float]]:
    x0, y0, x1, y1 = box
    cx, cy, rx, ry = (x0 + x1) / 2, (y0 + y1) / 2, (x1 - x0) / 2, (y1 - y0) / 2

    def ring(n: int, phase: float, radii=(1.0,)):
        pts = []
        for i in range(n * len(radii)):
            r = radii[i % len(radii)]
            a = phase + 2 * math.pi * i / (n * len(radii))
            pts.append((cx + r * rx * math.cos(a), cy + r * ry * math.sin(a)))
        return pts

    if shape == "square":
        return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
    if shape == "triangle":
        return [(cx, y0), (x1, y1), (x0, y1)]
    if shape == "diamond":
        return [(cx, y0), (x1, cy), (cx, y1), (x0, cy)]
    if shape == "pentagon":
        return ring(5, -math.pi / 2)
    if shape == "hexagon":
        return ring(6, 0)
    if shape == "star":
        return ring(5, -math.pi / 2, (1.0, 0.42))
    if shape == "cross":
        t = 0.32
        return [
            (cx - t * rx, y0), (cx + t * rx, y0), (cx + t * rx, cy - t * ry), (x1, cy - t * ry),
            (x1, cy + t * ry), (cx + t * rx, cy + t * ry), (cx + t * rx, y1), (cx - t * rx, y1),
            (cx - t * rx, cy + t * ry), (x0, cy + t * ry), (x0, cy - t * ry), (cx - t * rx, cy - t * ry),
        ]  # fmt: skip
    raise ValueError(shape)


def _draw_mask(draw: ImageDraw.ImageDraw, shape: str, box) -> None:
    if shape in ("circle", "ellipse"):
        draw.ellipse(box, fill=255)
    elif shape == "crescent":
        x0, y0, x1, y1 = box
        draw.ellipse(box, fill=255)
        dx = (x1 - x0) * 0.35
        draw.ellipse((x0 + dx, y0 - 1, x1 + dx, y1 - 1), fill=0)
    else:
        draw.polygon(_polygon(shape, box), fill=255)


def _texture(texture: str, rgb, size: int, rng: random.Random) -> Image.Image:
    img = Image.new("RGB", (size, size), rgb)
    if texture == "solid":
        return img
    shade = tuple(int(v * 0.6) if sum(rgb) > 200 else min(255, v + 70) for v in rgb)
    d = ImageDraw.Draw(img)
    step = max(3, size // 16)
    off = rng.randrange(step)
    if texture == "stripes":
        for x in range(-size + off, size, step * 2):
            d.line((x, 0, x + size, size), fill=shade, width=max(1, step // 2))
    elif texture == "dots":
        for y in range(off, size, step * 2):
            for x in range(off, size, step * 2):
                d.rectangle((x, y, x + step // 2, y + step // 2), fill=shade)
    elif texture == "checker":
        for y in range(0, size, step * 2):
            for x in range(0, size, step * 2):
                d.rectangle((x + off, y, x + off + step - 1, y + step - 1), fill=shade)
    return img


def render(scene: Scene, size: int, rng: random.Random, jitter: float = 0.0) -> Image.Image:
    """Draw the scene; ``jitter`` > 0 adds colour jitter, a gradient and pixel noise (companions)."""
    bg = tuple(int(np.clip(v + rng.uniform(-20, 20) * jitter, 0, 255)) for v in scene.background)
    img = Image.new("RGB", (size, size), bg)
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    for g, boxes in zip(scene.groups, scene.boxes):
        rgb = tuple(
            int(np.clip(v + rng.uniform(-25, 25) * jitter, 0, 255)) for v in COLOURS[g.colour][0]
        )
        fill = _texture(g.texture, rgb, size, rng)
        draw.rectangle((0, 0, size, size), fill=0)
        for box in boxes:
            _draw_mask(draw, g.shape, box)
        img.paste(fill, (0, 0), mask)
    if jitter > 0:
        arr = np.asarray(img, dtype=np.float32)
        nprng = np.random.default_rng(rng.getrandbits(32))
        ramp = np.linspace(-12, 12, size, dtype=np.float32)[None, :, None] * jitter
        arr = arr + ramp + nprng.normal(0, 8 * jitter, arr.shape).astype(np.float32)
        img = Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    return img


# --- captions ------------------------------------------------------------------------------------
@dataclass
class Caption:
    """A caption and the character spans of its shape nouns (``group`` indexes ``scene.groups``)."""

    text: str
    nouns: list[tuple[int, int, int]]  # (start, end, group)


class _Builder:
    def __init__(self) -> None:
        self.parts: list[str] = []
        self.len = 0
        self.nouns: list[tuple[int, int, int]] = []

    def add(self, s: str, group: int | None = None) -> _Builder:
        if group is not None:
            self.nouns.append((self.len, self.len + len(s), group))
        self.parts.append(s)
        self.len += len(s)
        return self

    def done(self) -> Caption:
        text = "".join(self.parts)
        if text[0].islower():  # sentence case; no noun ever starts a caption
            text = text[0].upper() + text[1:]
        return Caption(text, self.nouns)


def _np_en(b: _Builder, g: Group, gi: int, with_size: bool) -> _Builder:
    words = ([g.size] if with_size else []) + [g.colour]
    det = NUMBERS_EN[g.count]
    if det == "a" and words[0][0] in "aeiou":
        det = "an"
    noun = g.shape if g.count == 1 else SHAPES[g.shape][0]
    return b.add(f"{det} {' '.join(words)} ").add(noun, gi)


def _np_bn(b: _Builder, g: Group, gi: int, with_size: bool, genitive: bool = False) -> _Builder:
    words = [NUMBERS_BN[g.count]] + ([SIZES[g.size][1]] if with_size else [])
    noun = SHAPES[g.shape][1]
    b.add(" ".join([*words, COLOURS[g.colour][1]]) + " ").add(noun, gi)
    if genitive:
        b.add(bn_genitive(noun)[len(noun) :])
    return b


def _be(g: Group) -> str:
    return "is" if g.count == 1 else "are"


def captions(scene: Scene) -> tuple[list[Caption], list[Caption]]:
    """Five English captions and their five Bengali translations (same order)."""
    gs = scene.groups
    en: list[Caption] = []
    bn: list[Caption] = []
    if scene.relation is None:
        g = gs[0]
        en_t = [
            ("", False, "."),
            ("there {be} ", True, "."),
            ("", False, " {be} shown."),
            ("here {be} ", True, "."),
            ("only ", False, "."),
        ]
        bn_t = [("", False, "।"), ("", True, " আছে।"), ("", False, " দেখা যাচ্ছে।"),
                ("এখানে ", True, " আছে।"), ("শুধু ", False, " আছে।")]  # fmt: skip
        for (pre, sz, post), (bpre, bsz, bpost) in zip(en_t, bn_t):
            b = _np_en(_Builder().add(pre.format(be=_be(g))), g, 0, sz)
            en.append(b.add(post.format(be=_be(g))).done())
            bn.append(_np_bn(_Builder().add(bpre), g, 0, bsz).add(bpost).done())
        return en, bn
    a, c = gs
    rel_en, inv, rel_bn = RELATIONS[scene.relation]
    inv_en, _, inv_bn = RELATIONS[inv]
    # 0: A rel B.   1: There be A rel B.   2: B inv A.   3: A be rel B.   4: Rel B there be A.
    en.append(
        _np_en(_np_en(_Builder(), a, 0, False).add(f" {rel_en} "), c, 1, False).add(".").done()
    )
    b = _np_en(_Builder().add(f"there {_be(a)} "), a, 0, True).add(f" {rel_en} ")
    en.append(_np_en(b, c, 1, True).add(".").done())
    en.append(
        _np_en(_np_en(_Builder(), c, 1, False).add(f" {inv_en} "), a, 0, False).add(".").done()
    )
    b = _np_en(_Builder(), a, 0, False).add(f" {_be(a)} {rel_en} ")
    en.append(_np_en(b, c, 1, False).add(".").done())
    b = _np_en(_Builder().add(f"{rel_en} "), c, 1, True).add(f" there {_be(a)} ")
    en.append(_np_en(b, a, 0, True).add(".").done())
    # Bengali, same order: A B-এর rel।  A B-এর rel আছে।  B A-এর inv।  A B-এর rel রয়েছে।  B-এর rel A আছে।
    bn.append(
        _np_bn(_np_bn(_Builder(), a, 0, False).add(" "), c, 1, False, True)
        .add(f" {rel_bn}।")
        .done()
    )
    b = _np_bn(_np_bn(_Builder(), a, 0, True).add(" "), c, 1, True, True)
    bn.append(b.add(f" {rel_bn} আছে।").done())
    bn.append(
        _np_bn(_np_bn(_Builder(), c, 1, False).add(" "), a, 0, False, True)
        .add(f" {inv_bn}।")
        .done()
    )
    b = _np_bn(_np_bn(_Builder(), a, 0, False).add(" "), c, 1, False, True)
    bn.append(b.add(f" {rel_bn} রয়েছে।").done())
    b = _np_bn(_Builder(), c, 1, True, True).add(f" {rel_bn} ")
    bn.append(_np_bn(b, a, 0, True).add(" আছে।").done())
    return en, bn


# --- samples -------------------------------------------------------------------------------------
def _objects(scene: Scene) -> tuple[list[dict], list[list[int]]]:
    objects, members = [], []
    for g, boxes in zip(scene.groups, scene.boxes):
        members.append([])
        for box in boxes:
            members[-1].append(len(objects))
            objects.append(
                {"shape": g.shape, "colour": g.colour, "size": g.size, "texture": g.texture,
                 "box": [round(v, 2) for v in box]}
            )  # fmt: skip
    return objects, members


def _nouns_json(caps: list[Caption], members: list[list[int]], lang: str) -> list[list[dict]]:
    out = []
    for cap in caps:
        entries = []
        for start, end, gi in cap.nouns:
            text = cap.text[start:end]
            lemma = next(s for s, (pl, bn) in SHAPES.items() if text.lower() in (s, pl, bn))
            entries.append(
                {"text": text, "lemma": lemma if lang == "en" else text, "start": start, "end": end,
                 "object": members[gi][0], "objects": members[gi]}
            )  # fmt: skip
        out.append(entries)
    return out


def _jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def make_sample(
    seed: int,
    split: str,
    index: int,
    size: int = 64,
    triplet: bool = False,
    variant: str = "default",
) -> dict:
    """One shard sample (img2dataset layout): ``__key__``, ``jpg``, ``txt``, ``json`` [+ triplet keys].

    For ``split="probe"`` pass ``index = 2 * pair + member``: member 1 is member 0 with the two
    groups' colours swapped (even pairs) or the groups' positions swapped (odd pairs), and both
    members carry the caption template 0 of their own scene (Winoground-style). ``variant``: one of
    :data:`VARIANTS` (the JSON names it when it is not the default).
    """
    if split not in _SPLIT_SALT:
        raise ValueError(f"unknown split {split!r}; one of {SPLITS}")
    base = index // 2 if split == "probe" else index
    scene = make_scene(seed, split, base, size, variant)
    extra: dict = {}
    if split == "probe":
        kind = "attribute" if base % 2 == 0 else "relation"
        extra["probe"] = {"pair": base, "member": index % 2, "kind": kind}
        if index % 2 == 1:
            a, c = scene.groups
            if kind == "attribute":
                a, c = replace(a, colour=c.colour), replace(c, colour=a.colour)
                scene = Scene([a, c], scene.relation, scene.boxes, scene.background)
            else:  # same two groups, order of the relation swapped: c now sits where a was
                groups, boxes = layout(
                    [c, a], scene.relation, size, _rng(seed, split, base, "swap")
                )
                scene = Scene(groups, scene.relation, boxes, scene.background)
    rng = _rng(seed, split, index, "render")
    img = render(scene, size, rng)
    en, bn = captions(scene)
    objects, members = _objects(scene)
    meta = {
        "captions_en": [c.text for c in en],
        "captions_bn": [c.text for c in bn],
        "nouns": _nouns_json(en, members, "en"),
        "nouns_bn": _nouns_json(bn, members, "bn"),
        "objects": objects,
        "relation": scene.relation,
        "width": size,
        "height": size,
        "seed": seed,
        "split": split,
        "index": index,
        **({"variant": variant} if variant != "default" else {}),
        **extra,
    }
    if split in ("cls_shape", "cls_colour_shape"):
        g = scene.groups[0]
        label = g.shape if split == "cls_shape" else f"{g.colour} {g.shape}"
        meta["label"], meta["label_index"] = label, class_names(split, variant).index(label)
    sample = {"__key__": f"{index:09d}", "jpg": _jpeg(img), "txt": en[0].text, "json": meta}
    if triplet:
        syn_rng = _rng(seed, split, index, "companion")
        syn_scene = companion(scene, size, syn_rng)
        for _ in range(20):  # a cramped layout may shrink a group; redraw until the caption holds
            if captions(syn_scene)[0][0].text == en[0].text:
                break
            syn_scene = companion(scene, size, syn_rng)
        syn = render(syn_scene, size, syn_rng, jitter=1.0)
        sample |= {"syn.jpg": _jpeg(syn), "en.txt": en[0].text, "bn.txt": bn[0].text}
        meta["companion"] = {
            "generator": "bimac.data.world.companion",
            "seed": seed,
            "objects": _objects(syn_scene)[0],
            "captions_en": [c.text for c in captions(syn_scene)[0]],
        }
    return sample


def world_corpus(n: int = 2000, seed: int = 0) -> list[str]:
    """English and Bengali captions of ``n`` train scenes (the world tokenizer's training text)."""
    out: list[str] = []
    for i in range(n):
        en, bn = captions(make_scene(seed, "train", i))
        out += [c.text for c in en] + [c.text for c in bn]
    return out
