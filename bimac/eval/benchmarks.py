"""The field's benchmark formats, read as their authors publish them, and CLIP_benchmark's result JSON.

- ``clip_benchmark``: CLIP_benchmark's offline webdataset layout (``clip_benchmark.datasets.
  builder.build_wds_dataset``): ``ROOT/{test,train}/nshards.txt`` + ``0.tar 1.tar ...``,
  ``ROOT/dataset_type.txt`` (``retrieval``, else classification), ``ROOT/classnames.txt``,
  ``ROOT/zeroshot_classification_templates.txt`` (``{c}`` for the class name); samples are an image with a ``.cls`` label or,
  for retrieval, a ``.txt`` holding one caption per line.
- ``sugarcrepe``: ``ROOT/{add_att,add_obj,replace_att,replace_obj,replace_rel,swap_att,swap_obj}.json``
  (``{"0": {"filename", "caption", "negative_caption"}, ...}``; the sub-tasks present are read),
  images in ``ROOT/val2017`` (COCO val2017) or ``--images``.
- ``winoground``: ``ROOT/examples.jsonl`` (``image_0``, ``image_1``, ``caption_0``,
  ``caption_1``) with ``ROOT/images/<image>.png``.
- ``valse``: ``ROOT/<piece>.json`` (``{id: {"image_file", "caption", "foil", "mturk"}}``); only
  the validated foils (``mturk.caption >= 2``, the authors' rule) are scored; images in
  ``ROOT/images`` or ``--images``.
- ``spec``: ``ROOT/<subset>/image2text.json`` and ``text2image.json`` (lists of ``{"query",
  "keys", "label"}``; image paths relative to the subset folder).

Every instance is a small image set and caption set where image ``i`` belongs with caption ``i``
(CLIP_benchmark's "image_caption_selection"): ``text_acc``: each image scores its own caption
above every other caption; ``image_acc``: each caption scores its own image above every other;
``acc``: both. Ties fail (strict ``>``). SugarCrepe and VALSE are one image with the positive
and the negative caption (their accuracy is ``text_acc``); Winoground's text/image/group scores
are ``text_acc``/``image_acc``/``acc``; SPEC's image-to-text accuracy is ``text_acc`` of its
image2text sets, its text-to-image accuracy ``image_acc`` of its text2image sets.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from bimac.data.loader import SkipCounter
from bimac.data.samples import iter_samples
from bimac.eval.common import Encoder, embed_images, embed_texts, report

logger = logging.getLogger(__name__)

FORMATS = ("clip_benchmark", "sugarcrepe", "winoground", "valse", "spec")
SUGARCREPE_TASKS = (
    "add_att",
    "add_obj",
    "replace_att",
    "replace_obj",
    "replace_rel",
    "swap_att",
    "swap_obj",
)


class FormatError(ValueError):
    """A benchmark folder that does not hold the format asked for (the message names the file)."""


# -- CLIP_benchmark's webdataset layout --------------------------------------------------------


@dataclass
class ClipBenchmarkDataset:
    root: Path
    split: str
    kind: str  # "retrieval" or "classification"
    shards: str  # brace pattern of the split's tars
    classnames: list[str] | None
    templates: list[str] | None


def _lines(path: Path) -> list[str] | None:
    if not path.is_file():
        return None
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]


def read_clip_benchmark(root: str | Path, split: str = "test") -> ClipBenchmarkDataset:
    """The dataset at ``root`` in CLIP_benchmark's layout (see the module docstring)."""
    root = Path(root)
    nshards_file = root / split / "nshards.txt"
    if not nshards_file.is_file():
        raise FormatError(
            f"{nshards_file}: missing; a CLIP_benchmark webdataset folder has "
            f"{split}/nshards.txt beside {split}/0.tar ... (`python -m shards.world "
            "--format clip_benchmark` writes one)"
        )
    try:
        n = int(nshards_file.read_text().strip())
    except ValueError:
        raise FormatError(f"{nshards_file}: not a number of shards") from None
    kind_lines = _lines(root / "dataset_type.txt") or ["classification"]
    templates_file = root / "zeroshot_classification_templates.txt"
    kind = "retrieval" if kind_lines[0].lower() == "retrieval" else "classification"
    return ClipBenchmarkDataset(
        root=root,
        split=split,
        kind=kind,
        shards=str(root / split / (f"{{0..{n - 1}}}.tar" if n > 1 else "0.tar")),
        classnames=_lines(root / "classnames.txt"),
        # CLIP_benchmark formats templates with c=classname; bimac's placeholder is {}
        templates=[t.replace("{c}", "{}") for t in _lines(templates_file) or []] or None,
    )


def clip_benchmark_pairs(
    ds: ClipBenchmarkDataset, counter: SkipCounter, limit: int | None = None
) -> tuple[list[bytes], list[list[str]]]:
    """Images and their captions (the ``.txt`` lines) of a retrieval dataset."""
    images, captions = [], []
    for s in iter_samples(ds.shards, counter=counter):
        caps = [c.strip() for c in s.get("txt", "").splitlines() if c.strip()]
        if "jpg" not in s:
            counter.add("missing_image", f"{s['__url__']}#{s['__key__']}")
            continue
        if not caps:
            counter.add("missing_caption", f"{s['__url__']}#{s['__key__']}")
            continue
        images.append(s["jpg"])
        captions.append(caps)
        if limit and len(images) >= limit:
            break
    return images, captions


# -- image/caption selection benchmarks ----------------------------------------------------------


@dataclass
class Instance:
    """Images and captions of one test; image ``i`` belongs with caption ``i``."""

    images: list  # bytes or paths
    texts: list[str]


@dataclass
class Subset:
    name: str  # e.g. "swap_att", "relations", "absolute_size"
    dataset: str  # CLIP_benchmark-style dataset name, e.g. "sugar_crepe/swap_att"
    groups: dict[str, list[Instance]] = field(default_factory=dict)  # "" or "i2t"/"t2i" (SPEC)
    excluded: int = 0  # instances the format's own rule leaves out (VALSE: unvalidated foils)


def _load_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exn:
        raise FormatError(f"{path}: not JSON ({exn})") from None


def _field(path: Path, item: dict, key: str):
    if not isinstance(item, dict) or key not in item:
        raise FormatError(f"{path}: an entry lacks {key!r} ({str(item)[:80]})")
    return item[key]


def read_sugarcrepe(root: str | Path, images: str | Path | None = None) -> list[Subset]:
    root = Path(root)
    image_dir = Path(images) if images else root / "val2017"
    subsets = []
    for task in SUGARCREPE_TASKS:
        path = root / f"{task}.json"
        if not path.is_file():
            continue
        data = _load_json(path)
        tests = [
            Instance(
                [image_dir / _field(path, v, "filename")],
                [_field(path, v, "caption"), _field(path, v, "negative_caption")],
            )
            for v in data.values()
        ]
        subsets.append(Subset(task, f"sugar_crepe/{task}", {"": tests}))
    if not subsets:
        raise FormatError(f"{root}: no SugarCrepe file ({', '.join(SUGARCREPE_TASKS)}.json)")
    return subsets


def read_winoground(root: str | Path, images: str | Path | None = None) -> list[Subset]:
    root = Path(root)
    path = root if root.suffix == ".jsonl" else root / "examples.jsonl"
    if not path.is_file():
        raise FormatError(f"{path}: missing; Winoground's layout is examples.jsonl + images/")
    image_dir = Path(images) if images else path.parent / "images"
    tests = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            ex = json.loads(line)
        except ValueError as exn:
            raise FormatError(f"{path}: a line is not JSON ({exn})") from None
        names = [str(_field(path, ex, f"image_{m}")) for m in (0, 1)]
        tests.append(
            Instance(
                [image_dir / (n if Path(n).suffix else f"{n}.png") for n in names],
                [_field(path, ex, f"caption_{m}") for m in (0, 1)],
            )
        )
    return [Subset("winoground", "winoground", {"": tests})]


def read_valse(root: str | Path, images: str | Path | None = None) -> list[Subset]:
    root = Path(root)
    files = [root] if root.is_file() else sorted(root.glob("*.json"))
    if not files:
        raise FormatError(f"{root}: no VALSE piece (<piece>.json)")
    image_dir = Path(images) if images else (root.parent if root.is_file() else root) / "images"
    subsets = []
    for path in files:
        tests, excluded = [], 0
        for v in _load_json(path).values():
            if int(((v.get("mturk") if isinstance(v, dict) else None) or {}).get("caption", 3)) < 2:
                excluded += 1
                continue
            tests.append(
                Instance(
                    [image_dir / _field(path, v, "image_file")],
                    [_field(path, v, "caption"), _field(path, v, "foil")],
                )
            )
        subsets.append(Subset(path.stem, f"valse/{path.stem}", {"": tests}, excluded))
    return subsets


def _label_first(path: Path, item: dict) -> list:
    keys, label = list(_field(path, item, "keys")), _field(path, item, "label")
    if not isinstance(label, int) or not 0 <= label < len(keys):
        raise FormatError(f"{path}: label {label!r} is not an index of keys")
    return [keys[label]] + keys[:label] + keys[label + 1 :]


def read_spec(root: str | Path, images: str | Path | None = None) -> list[Subset]:
    root = Path(root)
    dirs = (
        [d for d in sorted(root.iterdir()) if (d / "image2text.json").is_file()]
        if root.is_dir()
        else []
    )
    if not dirs:
        raise FormatError(f"{root}: no SPEC subset (<subset>/image2text.json, text2image.json)")
    subsets = []
    for d in dirs:
        i2t_path, t2i_path = d / "image2text.json", d / "text2image.json"
        groups = {
            "i2t": [
                Instance([d / _field(i2t_path, q, "query")], _label_first(i2t_path, q))
                for q in _load_json(i2t_path)
            ]
        }
        if t2i_path.is_file():
            groups["t2i"] = [
                Instance([d / k for k in _label_first(t2i_path, q)], [_field(t2i_path, q, "query")])
                for q in _load_json(t2i_path)
            ]
        subsets.append(Subset(d.name, f"spec/{d.name}", groups))
    return subsets


READERS = {
    "sugarcrepe": read_sugarcrepe,
    "winoground": read_winoground,
    "valse": read_valse,
    "spec": read_spec,
}


def selection_scores(sims: list[torch.Tensor]) -> dict[str, float]:
    """``sims[n][i, t]`` = s(image i, caption t) of test n -> ``text_acc``, ``image_acc``, ``acc`` (%)."""
    text_ok, image_ok = [], []
    for s in sims:
        m = min(s.shape)
        own = s.diagonal()[:m]
        others_t = s[:m].clone()
        others_t[range(m), range(m)] = -torch.inf
        others_i = s[:, :m].clone()
        others_i[range(m), range(m)] = -torch.inf
        text_ok.append(bool((own > others_t.max(dim=1).values).all()) if s.shape[1] > 1 else True)
        image_ok.append(bool((own > others_i.max(dim=0).values).all()) if s.shape[0] > 1 else True)
    t, i = torch.tensor(text_ok), torch.tensor(image_ok)
    return {
        "text_acc": 100.0 * float(t.float().mean()),
        "image_acc": 100.0 * float(i.float().mean()),
        "acc": 100.0 * float((t & i).float().mean()),
    }


def _key(src) -> object:
    return src if isinstance(src, bytes) else str(src)


def evaluate_selection(encoder: Encoder, subsets: list[Subset], batch_size: int = 256) -> dict:
    """Scores of every subset (``{subset name: {metric: %}}``); each image and caption is
    embedded once even when tests share it."""
    tests = [t for s in subsets for g in s.groups.values() for t in g]
    image_index: dict = {}
    for t in tests:
        for src in t.images:
            image_index.setdefault(_key(src), src)
    missing = [
        p for p in image_index.values() if not isinstance(p, bytes) and not Path(p).is_file()
    ]
    if missing:
        raise FormatError(f"{missing[0]}: image not found ({len(missing)} missing; --images DIR?)")
    keys = list(image_index)
    img = embed_images(encoder, [image_index[k] for k in keys], batch_size, total=len(keys))
    row = {k: i for i, k in enumerate(keys)}
    texts = sorted({c for t in tests for c in t.texts})
    txt = embed_texts(encoder, texts, batch_size)
    col = {c: i for i, c in enumerate(texts)}

    def sims(group: list[Instance]) -> list[torch.Tensor]:
        return [
            img[[row[_key(s)] for s in t.images]] @ txt[[col[c] for c in t.texts]].T for t in group
        ]

    out = {}
    for s in subsets:
        if "i2t" in s.groups:  # SPEC: one accuracy per direction
            scores = {"text_acc": selection_scores(sims(s.groups["i2t"]))["text_acc"]}
            if "t2i" in s.groups:
                scores["image_acc"] = selection_scores(sims(s.groups["t2i"]))["image_acc"]
        else:
            scores = selection_scores(sims(s.groups[""]))
        scores["tests"] = sum(len(g) for g in s.groups.values())
        if s.excluded:
            scores["excluded"] = s.excluded
        out[s.name] = scores
    return out


# -- CLIP_benchmark's result JSON ----------------------------------------------------------------


def model_names(args) -> tuple[str, str]:
    """(model, pretrained) as CLIP_benchmark names them in its result JSON."""
    if getattr(args, "checkpoint", None):
        return "bimac", str(args.checkpoint)
    return str(args.open_clip), str(args.pretrained or "")


def clip_benchmark_result(
    dataset: str, task: str, metrics: dict[str, float], model: tuple[str, str], language="en"
) -> dict:
    """One CLIP_benchmark result (``clip_benchmark eval --output``): metrics are fractions."""
    return {
        "dataset": dataset,
        "model": model[0],
        "pretrained": model[1],
        "task": task,
        "metrics": metrics,
        "language": language,
    }


def retrieval_result_metrics(results: dict, ks=(1, 5, 10)) -> dict[str, float]:
    """bimac's ``t2i_R@k``/``i2t_R@k`` (%) under CLIP_benchmark's names (fractions): its image
    retrieval is text -> image."""
    out = {}
    for k in ks:
        out[f"image_retrieval_recall@{k}"] = results[f"t2i_R@{k}"] / 100.0
        out[f"text_retrieval_recall@{k}"] = results[f"i2t_R@{k}"] / 100.0
    return out


def classification_result_metrics(results: dict) -> dict[str, float]:
    out = {"acc1": results["top1"] / 100.0}
    if "top5" in results:
        out["acc5"] = results["top5"] / 100.0
    out["mean_per_class_recall"] = results["mean_per_class_recall"] / 100.0
    return out


def report_wds(results: dict, args, title: str, task: str) -> None:
    """bimac's table; ``--out`` gets CLIP_benchmark's result JSON with ``--format
    clip_benchmark`` (dataset ``wds/<folder name>``), else bimac's own numbers."""
    if not args.format:
        report(results, args.out, title)
        return
    report(results, None, title)
    metrics = {
        "zeroshot_retrieval": retrieval_result_metrics,
        "zeroshot_classification": classification_result_metrics,
    }[task](results)
    if args.out:
        name = f"wds/{Path(args.data).name}"
        write_results(args.out, [clip_benchmark_result(name, task, metrics, model_names(args))])


def write_results(out: str, results: list[dict]) -> list[Path]:
    """Write each CLIP_benchmark result to ``out`` (``{dataset}`` in it is replaced by the
    dataset name with ``/`` as ``_``, as CLIP_benchmark's ``--output`` does)."""
    if len(results) > 1 and "{dataset}" not in out:
        raise FormatError(
            f"--out {out}: {len(results)} datasets; put {{dataset}} in the file name "
            "(e.g. results/{dataset}.json)"
        )
    paths = []
    for r in results:
        path = Path(out.replace("{dataset}", r["dataset"].replace("/", "_")))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(r, indent=2, ensure_ascii=False))
        paths.append(path)
        logger.info("wrote %s", path)
    return paths
