"""Stage 3: a synthetic companion image per verified pair with Kandinsky 2.1 (PAL §4.2.3, eq. 5).

``python -m shards.bengali.synthesise --accepted work/verified/accepted.csv --out work/synthetic
[--shard-index $SLURM_ARRAY_TASK_ID] [num_shards=10]`` renders ``KEY.jpg`` for every accepted
pair of the shard from the bilingual prompt ``A photo of: EN. In Bengali: BN`` (truncated to the
77-token text limit, keeping content words of both languages), 768 x 768, fp16 on GPU, seed 42
for every item, the paper's negative prompt. Beside each image, ``KEY.json`` records what is needed
to regenerate it exactly (prompt, negative prompt, seed, steps, sizes, models and versions) and the
SHA-256 of the prompt and of the image file; :func:`regenerate` redoes one image from it.
"""

from __future__ import annotations

import hashlib
import io
import logging
import re
import string
import sys
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from PIL import Image

from bimac.config import parse_cli, run_main
from shards.bengali.resumable import (
    ShardRun,
    atomic_write_bytes,
    atomic_write_json,
    pending_shards,
    read_csv,
    require_input,
    setup_logging,
    shard_bounds,
)
from shards.bengali.translate import pick_device

log = logging.getLogger(__name__)

FIELDS = ["key", "caption_id", "image_id", "en", "bn", "similarity", "image", "sidecar"]
PROMPT_TEMPLATE = "A photo of: {en}. In Bengali: {bn}"
NEGATIVE_PROMPT = "low quality, bad anatomy, watermark"

# Function words dropped first when a caption must be shortened; everything else is content.
# Compared after NFC normalisation (Bengali য় has two spellings).
EN_STOPWORDS = frozenset((
    "a", "an", "the", "of", "in", "on", "at", "to", "with", "and", "or", "is", "are", "was",
    "were", "be", "been", "being", "its", "it", "this", "that", "these", "those", "there",
    "some", "by", "for", "from", "as", "into", "onto", "while", "his", "her", "their", "our",
    "your", "which", "who", "has", "have", "very", "up", "down",
))  # fmt: skip
BN_STOPWORDS = frozenset(unicodedata.normalize("NFC", w) for w in (
    "একটি", "একটা", "একজন", "এবং", "ও", "আর", "এর", "এই", "সেই", "যে", "যা", "হয়", "হচ্ছে",
    "হয়েছে", "আছে", "রয়েছে", "করে", "করছে", "কিছু", "তার", "তাদের", "সঙ্গে", "সাথে", "জন্য",
    "থেকে", "দিয়ে", "মধ্যে", "উপর", "উপরে", "কাছে", "খুব", "কি",
))  # fmt: skip


_PUNCTUATION = string.punctuation + "।‘’“”"


@dataclass
class SynthesiseConfig:
    accepted: Path = Path("work/bengali/verified/accepted.csv")  # verify --merge output
    out: Path = Path("work/bengali/synthetic")
    prior_model: str = "kandinsky-community/kandinsky-2-1-prior"  # hub name or local path
    decoder_model: str = "kandinsky-community/kandinsky-2-1"
    height: int = 768
    width: int = 768
    seed: int = 42  # the same seed for every item (PAL §4.2.3)
    negative_prompt: str = NEGATIVE_PROMPT
    prior_steps: int = 25
    decoder_steps: int = 100
    prior_guidance_scale: float = 4.0
    guidance_scale: float = 4.0
    max_tokens: int = 77  # CLIP / M-CLIP text limit
    en_tokens: int = 37  # the English share of max_tokens; Bengali gets the rest (~40)
    num_shards: int = 10
    shard_index: int | None = None  # None: all shards (or SLURM_ARRAY_TASK_ID when set)
    batch_size: int = 16  # items per saved progress part (images are rendered one at a time)
    jpeg_quality: int = 95
    device: str = "auto"
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = "auto"  # auto: fp16 GPU, fp32 CPU


def build_prompt(en: str, bn: str) -> str:
    """The bilingual prompt of PAL eq. 5."""
    return PROMPT_TEMPLATE.format(en=en.strip().rstrip("."), bn=bn.strip())


def prompt_sha256(prompt: str) -> str:
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()


def _drop_one(words: list[str], stopwords: frozenset[str]) -> None:
    """Remove the last function word, or the last word when there is none."""
    for i in range(len(words) - 1, -1, -1):
        if unicodedata.normalize("NFC", words[i].lower().strip(_PUNCTUATION)) in stopwords:
            del words[i]
            return
    words.pop()


def truncate_pair(
    en: str,
    bn: str,
    count_tokens: Callable[[str], int],
    max_tokens: int = 77,
    en_tokens: int = 37,
) -> tuple[str, str]:
    """Shorten ``en``/``bn`` word by word until their prompt has at most ``max_tokens`` tokens.

    Each step takes a word from the language further over its share (``en_tokens`` English,
    ``max_tokens - en_tokens`` Bengali); within it, function words go first (from the end), then
    the last word. Words are never cut in half. ``count_tokens(text)`` is the tokenizer's length.
    """
    en_words, bn_words = en.split(), bn.split()
    sides = ((en_words, EN_STOPWORDS, en_tokens), (bn_words, BN_STOPWORDS, max_tokens - en_tokens))
    while count_tokens(build_prompt(" ".join(en_words), " ".join(bn_words))) > max_tokens:
        over = [
            (count_tokens(" ".join(w)) - share, -i) for i, (w, _, share) in enumerate(sides) if w
        ]
        if not over:
            raise ValueError(f"the prompt template alone exceeds {max_tokens} tokens")
        words, stopwords, _ = sides[-max(over)[1]]  # the side furthest over; a tie -> English
        _drop_one(words, stopwords)
    return " ".join(en_words), " ".join(bn_words)


def sample_key(caption_id: Any) -> str:
    """WebDataset key of a caption: its id, zero-padded (no dots: they start the extension)."""
    text = str(caption_id)
    return f"{int(text):012d}" if text.isdigit() else re.sub(r"[^\w-]", "_", text)


def _version(pipe: Any, name: str) -> dict[str, Any]:
    """Name and, for a hub download, the commit of a loaded pipeline (for the sidecar).

    A pipeline loaded from the hub knows its snapshot folder (``.../snapshots/<commit>``) through
    its components' configs; a local folder has no commit.
    """
    paths = [str(getattr(pipe, "name_or_path", None) or "")]
    for component in getattr(pipe, "components", {}).values():
        config = getattr(component, "config", None)
        if isinstance(config, dict):  # diffusers models and schedulers
            paths.append(str(config.get("_name_or_path", "")))
        elif config is not None:  # transformers models
            paths += [
                str(getattr(config, "_commit_hash", None) or ""),
                str(getattr(config, "_name_or_path", "")),
            ]
    commit = re.search(r"(?:^|snapshots/)([0-9a-f]{40})\b", "\n".join(paths), re.MULTILINE)
    return {"name": name, "revision": commit.group(1) if commit else None}


def image_bytes(image: Image.Image, quality: int) -> bytes:
    buf = io.BytesIO()
    image.convert("RGB").save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


class KandinskySynthesiser:
    """Kandinsky 2.1 prior + decoder behind one call: prompt -> PIL image, seeded per item.

    ``prior``/``decoder`` default to loading ``cfg.prior_model``/``cfg.decoder_model``; tests and
    callers holding pipelines already may pass them in.
    """

    def __init__(self, cfg: SynthesiseConfig, prior: Any = None, decoder: Any = None):
        from diffusers import KandinskyPipeline, KandinskyPriorPipeline

        self.cfg = cfg
        self.device = pick_device(cfg.device)
        dtype = {
            "auto": torch.float16 if self.device.type == "cuda" else torch.float32,
            "float16": torch.float16,
            "float32": torch.float32,
            "bfloat16": torch.bfloat16,
        }[cfg.dtype]
        if prior is None:
            prior = KandinskyPriorPipeline.from_pretrained(cfg.prior_model, torch_dtype=dtype)
        if decoder is None:
            decoder = KandinskyPipeline.from_pretrained(cfg.decoder_model, torch_dtype=dtype)
        self.prior = prior.to(self.device)
        self.decoder = decoder.to(self.device)
        for pipe in (self.prior, self.decoder):
            pipe.set_progress_bar_config(disable=True)
        self.dtype = str(dtype).removeprefix("torch.")

    def count_tokens(self, text: str) -> int:
        """Tokens of ``text`` under the stricter of the prior's and the decoder's tokenizers."""
        return max(
            len(tok(text, verbose=False).input_ids)
            for tok in (self.prior.tokenizer, self.decoder.tokenizer)
        )

    def settings(self) -> dict[str, Any]:
        """Everything besides the prompt that determines an image."""
        import diffusers

        c = self.cfg
        return {
            "negative_prompt": c.negative_prompt,
            "seed": c.seed,
            "height": c.height,
            "width": c.width,
            "prior_steps": c.prior_steps,
            "decoder_steps": c.decoder_steps,
            "prior_guidance_scale": c.prior_guidance_scale,
            "guidance_scale": c.guidance_scale,
            "prior_model": _version(self.prior, c.prior_model),
            "decoder_model": _version(self.decoder, c.decoder_model),
            "dtype": self.dtype,
            "device": self.device.type,
            "versions": {"diffusers": diffusers.__version__, "torch": torch.__version__},
            "generator": "torch.Generator('cpu').manual_seed(seed), fresh for prior and decoder",
        }

    @torch.inference_mode()
    def generate(self, prompt: str, settings: dict[str, Any]) -> Image.Image:
        """Render ``prompt`` with ``settings`` (as returned by :meth:`settings`)."""
        s = settings
        prior_out = self.prior(
            prompt,
            negative_prompt=s["negative_prompt"],
            num_inference_steps=s["prior_steps"],
            guidance_scale=s["prior_guidance_scale"],
            generator=torch.Generator("cpu").manual_seed(s["seed"]),
        )
        return self.decoder(
            prompt,
            image_embeds=prior_out.image_embeds,
            negative_image_embeds=prior_out.negative_image_embeds,
            negative_prompt=s["negative_prompt"],
            height=s["height"],
            width=s["width"],
            num_inference_steps=s["decoder_steps"],
            guidance_scale=s["guidance_scale"],
            generator=torch.Generator("cpu").manual_seed(s["seed"]),
            output_type="pil",
        ).images[0]


def synthesise_item(item: dict[str, Any], synth: KandinskySynthesiser, out: Path) -> dict[str, Any]:
    """Render one accepted pair (or reuse its finished image) and return its output row."""
    key = sample_key(item["caption_id"])
    image_path, sidecar_path = out / "images" / f"{key}.jpg", out / "images" / f"{key}.json"
    if not sidecar_path.is_file():  # the sidecar is written after the image: present = done
        en, bn = truncate_pair(
            item["en"], item["bn"], synth.count_tokens, synth.cfg.max_tokens, synth.cfg.en_tokens
        )
        prompt = build_prompt(en, bn)
        settings = synth.settings()
        data = image_bytes(synth.generate(prompt, settings), synth.cfg.jpeg_quality)
        atomic_write_bytes(image_path, data)
        atomic_write_json(
            sidecar_path,
            {
                "key": key,
                "caption_id": item["caption_id"],
                "image_id": item["image_id"],
                "en": item["en"],
                "bn": item["bn"],
                "similarity": float(item["similarity"]),
                "prompt": prompt,
                "prompt_sha256": prompt_sha256(prompt),
                "jpeg_quality": synth.cfg.jpeg_quality,
                "image_sha256": hashlib.sha256(data).hexdigest(),
                **settings,
            },
        )
    return {
        **{k: item[k] for k in ("caption_id", "image_id", "en", "bn", "similarity")},
        "key": key,
        "image": f"images/{key}.jpg",
        "sidecar": f"images/{key}.json",
    }


def regenerate(sidecar: dict[str, Any], synth: KandinskySynthesiser) -> bytes:
    """Re-render the image a sidecar describes; returns the JPEG bytes (compare ``image_sha256``)."""
    if prompt_sha256(sidecar["prompt"]) != sidecar["prompt_sha256"]:
        raise ValueError(f"sidecar {sidecar['key']}: the prompt does not match its SHA-256")
    for role in ("prior_model", "decoder_model"):
        if sidecar[role]["name"] != getattr(synth.cfg, role):
            log.warning(
                "regenerate %s: %s was %s, now %s",
                sidecar["key"],
                role,
                sidecar[role]["name"],
                getattr(synth.cfg, role),
            )
    return image_bytes(synth.generate(sidecar["prompt"], sidecar), sidecar["jpeg_quality"])


def synthesise_shard(
    rows: list[dict[str, Any]], synth: KandinskySynthesiser, index: int
) -> dict[str, Any]:
    """Render shard ``index`` of the accepted pairs ``rows``; return its summary."""
    cfg = synth.cfg
    start, end = shard_bounds(len(rows), cfg.num_shards, index)

    def check(item: dict[str, Any]) -> str | None:
        return "empty" if not item["en"].strip() or not item["bn"].strip() else None

    def process(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [synthesise_item(it, synth, Path(cfg.out)) for it in items]

    run = ShardRun(cfg.out, "synthesise", index, FIELDS)
    return run.run(rows[start:end], cfg.batch_size, check, process)


PROG = "python -m shards.bengali.synthesise"


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    setup_logging()
    cfg = parse_cli(SynthesiseConfig, PROG, __doc__, argv, "stage YAML (configs/bengali/*.yaml)")
    require_input(cfg.accepted, "accepted", "`python -m shards.bengali.verify --merge` writes it")
    todo = pending_shards(cfg.out, "synthesise", range(cfg.num_shards), cfg.shard_index, FIELDS)
    if not todo:
        return []
    rows = read_csv(cfg.accepted)
    synth = KandinskySynthesiser(cfg)
    return [synthesise_shard(rows, synth, i) for i in todo]


if __name__ == "__main__":
    sys.exit(run_main(main, PROG))
