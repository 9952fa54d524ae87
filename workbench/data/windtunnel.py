"""The wind tunnel: a seeded world of coloured shapes with questions about them.

`write_windtunnel` writes a LLaVA-format VQA set (JSON + image folder), an image-folder
classification set and a ready-made processor (word-level tokenizer + image processor) that
models trained on the world save next to their weights. Everything downstream reads these
files through the same loaders that read real data (`workbench/data/llava.py`).

Design (see README "The wind tunnel"): the canvas is a 2x2 or 3x3 grid of 16-pixel cells
and each shape sits inside one cell, so with 16-pixel patches every image token sees exactly
one whole object. Colour-shape binding is then local to a token and the language model's
only job is to find the right image token, which is what makes a tiny teacher reliably
strong.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

WORLD_VERSION = 1

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 80, 240),
    "yellow": (240, 220, 40),
    "purple": (160, 60, 210),
    "cyan": (40, 220, 220),
}
SHAPES = ("square", "triangle", "cross")
ROWS = ("top", "middle", "bottom")
COLS = ("left", "center", "right")
CELL = 16  # pixels per grid cell = the processor's patch size
GRID_NAMES = {2: (("top", "bottom"), ("left", "right")), 3: (ROWS, COLS)}
NUMBERS = ("zero", "one", "two", "three", "four")
QUESTION_TYPES = ("count", "color", "shape", "presence", "position", "cell")
# asked only when named in `question_types`: "describe the picture ?" -> every object with its
# place, in reading order ("red square top left and blue cross bottom right"), a long answer
# that depends on the image throughout (for drafts in speculative decoding)
EXTRA_QUESTION_TYPES = ("describe",)
EXTRA_WORDS = ("describe", "picture", "and")  # appended to the vocabulary of worlds that ask "describe"

# Chat format of the world's processor: LLaVA-1.5 style, images where the user turn puts them.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>{% else %}{{ part['text'] }}{% endif %}"
    "{% if not loop.last %}\n{% endif %}"
    "{% endfor %}{% endif %} "
    "{% else %}ASSISTANT: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{{ part['text'] }}{% endfor %}{% endif %}"
    "</s> {% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
SPECIAL_TOKENS = ("<pad>", "<unk>", "<s>", "</s>", "<image>")
TEMPLATE_WORDS = ("USER", "ASSISTANT", ":", "?")
QUESTION_WORDS = (
    "how", "many", "shapes", "are", "there", "what", "color", "is", "the", "shape",
    "one", "a", "where", "yes", "no", "in", "nothing",
)


@dataclass(frozen=True)
class WorldConfig:
    """Parameters of a generated world; together with `seed` they fix every pixel."""

    grid: int = 3  # cells per side (2 or 3); each cell is one 16-pixel patch
    max_shapes: int = 3
    min_shapes: int = 1  # objects per scene: min_shapes..max_shapes (2..2 on a 2x2 grid: half the cells empty)
    noise: float = 12.0  # std of per-pixel Gaussian noise, in 0..255 units
    jitter: float = 1.0  # max shift (pixels) of a shape's centre within its cell
    questions_per_image: int = 6
    question_first: bool = False  # "question\n<image>" instead of "<image>\nquestion" in turn 1
    question_types: tuple[str, ...] = QUESTION_TYPES  # which kinds of question are asked
    frames: int = 1  # > 1: each record is a clip of this many frames (one image each) sharing content
    min_frames: int | None = None  # clips of min_frames..frames frames, drawn per record (default: all `frames`)
    motion: float = 0.5  # in a clip: chance that an object steps to a free neighbouring cell between frames

    @property
    def image_size(self) -> int:
        return CELL * self.grid


def vocabulary(extra: bool = False) -> list[str]:
    """Every word the world's conversations use, special tokens first (fixed ids); `extra`
    appends the words of the extra question types (after every other word, so ids stay)."""
    words = list(SPECIAL_TOKENS) + list(TEMPLATE_WORDS) + list(QUESTION_WORDS)
    words += list(COLOURS) + list(SHAPES) + list(ROWS) + list(COLS) + list(NUMBERS)
    words += list(EXTRA_WORDS) if extra else []
    seen: dict[str, None] = {}
    for w in words:
        seen.setdefault(w, None)
    return list(seen)


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float, fill) -> None:
    # Shapes differ in which parts of the cell they fill (corners, centre, arms), not just in
    # area, so a 16-pixel patch embedding separates them early in training.
    if kind == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif kind == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    elif kind == "cross":
        w = r / 2.5
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
    else:  # pragma: no cover - SHAPES is closed
        raise ValueError(kind)


def render(objects: list[dict], world: WorldConfig, rng: random.Random,
           background: tuple[int, int, int] | None = None) -> Image.Image:
    """Draw `objects` ({colour, shape, row, col}) on a noisy canvas (of a random dark colour, or
    `background`: the frames of a clip share theirs)."""
    size, cell = world.image_size, CELL
    bg = background or tuple(rng.randint(20, 60) for _ in range(3))
    img = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(img)
    for obj in objects:
        r = rng.uniform(0.34, 0.40) * cell
        jitter = min(world.jitter, cell / 2 - r - 1)
        cx = obj["col"] * cell + cell / 2 + rng.uniform(-jitter, jitter)
        cy = obj["row"] * cell + cell / 2 + rng.uniform(-jitter, jitter)
        base = COLOURS[obj["colour"]]
        fill = tuple(int(min(255, max(0, c + rng.randint(-25, 25)))) for c in base)
        _draw_shape(draw, obj["shape"], cx, cy, r, fill)
    arr = np.asarray(img, dtype=np.float32)
    noise = np.random.default_rng(rng.getrandbits(32)).normal(0.0, world.noise, arr.shape)
    return Image.fromarray(np.clip(arr + noise, 0, 255).astype(np.uint8))


def sample_scene(world: WorldConfig, rng: random.Random) -> list[dict]:
    """min_shapes..max_shapes objects in distinct cells, no (colour, shape) pair repeated."""
    n = rng.randint(world.min_shapes, world.max_shapes)
    cells = rng.sample(range(world.grid * world.grid), n)
    pairs = rng.sample([(c, s) for c in COLOURS for s in SHAPES], n)
    return [
        {"colour": c, "shape": s, "row": cell // world.grid, "col": cell % world.grid}
        for cell, (c, s) in zip(cells, pairs)
    ]


def _position(obj: dict, grid: int = 3) -> str:
    rows, cols = GRID_NAMES[grid]
    return f"{rows[obj['row']]} {cols[obj['col']]}"


def ask(objects: list[dict], qtype: str, rng: random.Random, grid: int = 3) -> tuple[str, str] | None:
    """A (question, answer) pair of type `qtype` about the scene, or None if ill-posed."""
    if qtype == "count":
        return "how many shapes are there ?", NUMBERS[len(objects)]
    if qtype == "color":
        unique = [o for o in objects if sum(p["shape"] == o["shape"] for p in objects) == 1]
        if not unique:
            return None
        o = rng.choice(unique)
        return f"what color is the {o['shape']} ?", o["colour"]
    if qtype == "shape":
        unique = [o for o in objects if sum(p["colour"] == o["colour"] for p in objects) == 1]
        if not unique:
            return None
        o = rng.choice(unique)
        return f"what shape is the {o['colour']} one ?", o["shape"]
    if qtype == "presence":
        present = {(o["colour"], o["shape"]) for o in objects}
        if rng.random() < 0.5:
            c, s = rng.choice(sorted(present))
            return f"is there a {c} {s} ?", "yes"
        # Hard negatives: keep the colour or the shape of an object that is there.
        o = rng.choice(objects)
        same_colour = [(o["colour"], s) for s in SHAPES if (o["colour"], s) not in present]
        same_shape = [(c, o["shape"]) for c in COLOURS if (c, o["shape"]) not in present]
        options = same_colour if (rng.random() < 0.5 and same_colour) else same_shape
        c, s = rng.choice(options)
        return f"is there a {c} {s} ?", "no"
    if qtype == "position":
        o = rng.choice(objects)
        return f"where is the {o['colour']} {o['shape']} ?", _position(o, grid)
    if qtype == "describe":
        ordered = sorted(objects, key=lambda o: (o["row"], o["col"]))
        return "describe the picture ?", " and ".join(f"{o['colour']} {o['shape']} {_position(o, grid)}"
                                                      for o in ordered)
    if qtype == "cell":  # looks up a cell by name: teaches the tower what each cell holds
        if rng.random() < 0.25:
            taken = {(o["row"], o["col"]) for o in objects}
            free = [(r, c) for r in range(grid) for c in range(grid) if (r, c) not in taken]
            if free:
                r, c = rng.choice(free)
                return f"what is in the {_position({'row': r, 'col': c}, grid)} ?", "nothing"
        o = rng.choice(objects)
        return f"what is in the {_position(o, grid)} ?", f"{o['colour']} {o['shape']}"
    raise ValueError(f"unknown question type {qtype!r}")


def move(objects: list[dict], world: WorldConfig, rng: random.Random) -> list[dict]:
    """The next frame's scene: each object steps to a random free neighbouring cell (up, down,
    left, right) with probability `world.motion`, one object after another."""
    taken = {(o["row"], o["col"]) for o in objects}
    out = []
    for o in objects:
        o = dict(o)
        if rng.random() < world.motion:
            steps = [(o["row"] + dr, o["col"] + dc) for dr, dc in ((-1, 0), (1, 0), (0, -1), (0, 1))]
            free = [(r, c) for r, c in steps if 0 <= r < world.grid and 0 <= c < world.grid and (r, c) not in taken]
            if free:
                taken.discard((o["row"], o["col"]))
                o["row"], o["col"] = rng.choice(free)
                taken.add((o["row"], o["col"]))
        out.append(o)
    return out


def _frames(split: str, i: int, objects: list[dict], world: WorldConfig, rng: random.Random,
            image_dir: Path) -> tuple[list[dict], str | list[str]]:
    """Render one record's image (or a clip's frames: shared background and objects, fresh noise
    and jitter, objects moving); returns the last frame's scene and the file name(s)."""
    if world.frames == 1:
        name = f"{split}-{i:06d}.png"
        render(objects, world, rng).save(image_dir / name)
        return objects, f"images/{name}"
    count = world.frames if world.min_frames in (None, world.frames) else rng.randint(world.min_frames, world.frames)
    background = tuple(rng.randint(20, 60) for _ in range(3))
    names = []
    for f in range(count):
        if f:
            objects = move(objects, world, rng)
        name = f"{split}-{i:06d}-f{f}.png"
        render(objects, world, rng, background).save(image_dir / name)
        names.append(f"images/{name}")
    return objects, names


def object_patches(pixel_values, patch_size: int, image_mean, image_std, level: int = 150, pixels: int = 4):
    """(images, patches) bool, patches in raster order: which patches of processed wind-tunnel
    images show part of an object - at least `pixels` pixels with a channel above `level`
    (shapes are drawn with a channel of 200 or more, the background below 60 plus noise)."""
    import torch

    mean = torch.as_tensor(image_mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.as_tensor(image_std, dtype=torch.float32).view(1, -1, 1, 1)
    bright = ((pixel_values.float() * std + mean) * 255).amax(1) > level  # (images, H, W)
    n, h, w = bright.shape
    per_patch = bright.view(n, h // patch_size, patch_size, w // patch_size, patch_size).sum((2, 4))
    return (per_patch >= pixels).flatten(1)


def _records(split: str, n_images: int, world: WorldConfig, seed: int, image_dir: Path) -> list[dict]:
    """One record per image (or clip): a multi-turn conversation of `questions_per_image`
    questions; in a clip, positions are asked about the last frame."""
    rng = random.Random(f"{seed}-{split}")
    records = []
    for i in tqdm(range(n_images), desc=f"wind tunnel {split}", leave=False, mininterval=1.0):
        objects, image = _frames(split, i, sample_scene(world, rng), world, rng, image_dir)
        tags = "\n".join(["<image>"] * (len(image) if isinstance(image, list) else 1))
        turns, qtypes = [], []
        for qtype in rng.sample(world.question_types, world.questions_per_image):
            qa = ask(objects, qtype, rng, world.grid)
            if qa is None:  # e.g. no shape occurs exactly once: ask where something is (or what a cell holds)
                qtype = "position" if "position" in world.question_types else "cell"
                qa = ask(objects, qtype, rng, world.grid)
            question, answer = qa
            if not turns:
                question = f"{question}\n{tags}" if world.question_first else f"{tags}\n{question}"
            turns += [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
            qtypes.append(qtype)
        records.append({"id": f"{split}-{i:06d}", "image": image, "qtypes": qtypes, "conversations": turns})
    return records


def _classification(root: Path, split: str, n: int, world: WorldConfig, seed: int) -> None:
    rng = random.Random(f"{seed}-cls-{split}")
    classes = [(c, s) for c in COLOURS for s in SHAPES]
    for i in range(n):
        colour, shape = classes[i % len(classes)]  # balanced: every class once per 18 images
        cell = rng.randrange(world.grid * world.grid)
        obj = {"colour": colour, "shape": shape, "row": cell // world.grid, "col": cell % world.grid}
        folder = root / split / f"{colour}_{shape}"
        folder.mkdir(parents=True, exist_ok=True)
        render([obj], world, rng).save(folder / f"{i:06d}.png")


def build_processor(world: WorldConfig, patch_size: int = CELL):
    """A LLaVA processor for the world: word-level tokenizer, CLIP image processor, chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(vocabulary(extra=bool(set(EXTRA_QUESTION_TYPES) & set(world.question_types))))}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
        eos_token="</s>", extra_special_tokens={"image_token": "<image>"},
        padding_side="right", model_max_length=512,
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": world.image_size},
        crop_size={"height": world.image_size, "width": world.image_size},
        do_center_crop=True, do_convert_rgb=True,
    )
    return LlavaProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=patch_size,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        image_token="<image>", chat_template=CHAT_TEMPLATE,
    )


def write_windtunnel(
    out: str | Path,
    n_train: int = 8000,
    n_val: int = 500,
    seed: int = 0,
    n_classification: int = 0,
    world: WorldConfig = WorldConfig(),
    patch_size: int = CELL,
) -> Path:
    """Write the world to `out`: train.json, val.json, images/, processor/, classification/.

    Args:
        out: target folder; created, and refused if it already holds a world.
        n_train, n_val: number of training / held-out *images* or clips (each carries
            `world.questions_per_image` conversations, as separate records).
        seed: fixes every image and question; train and val use disjoint streams.
        n_classification: training images of the image-folder classification set
            (`classification/{train,val}/<colour>_<shape>/`, 18 classes in turn, one shape
            in a random cell; val gets a fifth as many); 0 skips it.
        patch_size: the processor's patch side: CELL (16) gives one image token per cell, 4
            gives 16 per cell (a high-resolution world: image tokens outnumber the text).
    Returns:
        The folder, with a `world.json` manifest of these arguments.
    """
    out = Path(out)
    if (out / "world.json").exists():
        raise FileExistsError(f"{out} already holds a wind tunnel (world.json); pick another --out")
    image_dir = out / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("val", n_val)):
        records = _records(split, n, world, seed, image_dir)
        (out / f"{split}.json").write_text(json.dumps(records))
    if n_classification:
        _classification(out / "classification", "train", n_classification, world, seed)
        _classification(out / "classification", "val", max(1, n_classification // 5), world, seed)
    build_processor(world, patch_size).save_pretrained(out / "processor")
    manifest = {"version": WORLD_VERSION, "seed": seed, "n_train": n_train, "n_val": n_val,
                "n_classification": n_classification, "image_size": world.image_size, "patch_size": patch_size,
                **asdict(world)}
    (out / "world.json").write_text(json.dumps(manifest, indent=2))
    return out
