"""Tiny random-weight stand-ins for the Bengali pipeline's models, built offline.

Vocabularies come from the embedded world's EN/BN captions (:func:`bimac.data.world.world_corpus`);
SentencePiece models are trained on them. Every builder saves to / returns from ``tmp_path`` so the
stages load them through their real ``from_pretrained`` code paths.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import sentencepiece as spm
import torch

from bimac.data.world import world_corpus


def corpus() -> tuple[list[str], list[str]]:
    """(English, Bengali) captions of the embedded world."""
    text = world_corpus(60)
    bn = [t for t in text if re.search("[\u0980-\u09ff]", t)]
    en = [t for t in text if t not in set(bn)]
    return en, bn


def coco_json(path: Path, captions: list[str]) -> Path:
    """A COCO caption JSON with ``captions`` (ids 100.., two captions per image)."""
    anns = [{"id": 100 + i, "image_id": 1 + i // 2, "caption": c} for i, c in enumerate(captions)]
    path.write_text(json.dumps({"images": [], "annotations": anns}))
    return path


def _train_spm(lines: list[str], prefix: Path, vocab_size: int) -> spm.SentencePieceProcessor:
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_prefix=str(prefix), vocab_size=vocab_size,
        model_type="unigram", character_coverage=1.0, hard_vocab_limit=False, minloglevel=2,
        bos_id=-1, eos_id=-1, unk_id=0,
    )  # fmt: skip
    return spm.SentencePieceProcessor(model_file=f"{prefix}.model")


def tiny_marian(root: Path) -> Path:
    """Directory with a random-weight MarianMT + MarianTokenizer (source/target SentencePiece)."""
    from transformers import MarianConfig, MarianMTModel, MarianTokenizer

    en, bn = corpus()
    root.mkdir(parents=True, exist_ok=True)
    src = _train_spm(en, root / "src", 120)
    tgt = _train_spm(bn, root / "tgt", 160)
    pieces = ["</s>", "<unk>"]
    for sp in (src, tgt):
        pieces += [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    vocab = {p: i for i, p in enumerate(dict.fromkeys(pieces))}
    vocab["<pad>"] = len(vocab)
    (root / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    tok = MarianTokenizer(
        str(root / "src.model"), str(root / "tgt.model"), str(root / "vocab.json")
    )
    torch.manual_seed(0)
    config = MarianConfig(
        vocab_size=len(vocab), d_model=16, encoder_layers=1, decoder_layers=1,
        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
        decoder_ffn_dim=32, max_position_embeddings=128, pad_token_id=vocab["<pad>"],
        eos_token_id=vocab["</s>"], decoder_start_token_id=vocab["<pad>"], forced_eos_token_id=None,
    )  # fmt: skip
    model = MarianMTModel(config).eval()
    model.generation_config.num_beams = 1
    model.generation_config.max_new_tokens = 12
    out = root / "model"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def tiny_labse(root: Path) -> Path:
    """Directory with a sentence-transformer: tiny random BERT + mean pooling + normalisation."""
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
    from transformers import BertConfig, BertModel, BertTokenizer

    en, bn = corpus()
    words = sorted({w for t in en + bn for w in re.findall(r"\w+|[^\w\s]", t.lower())})
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words])}
    tok = BertTokenizer(vocab=vocab, do_lower_case=True, strip_accents=False)
    torch.manual_seed(0)
    bert = BertModel(
        BertConfig(
            vocab_size=len(vocab),
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=128,
        )
    )
    bert.save_pretrained(root / "bert")
    tok.save_pretrained(root / "bert")
    word = Transformer(str(root / "bert"), max_seq_length=64)
    st = SentenceTransformer(modules=[word, Pooling(16, "mean"), Normalize()], device="cpu")
    st.save(str(root / "st"))
    return root / "st"


def byte_clip_tokenizer():
    """A CLIP tokenizer whose vocabulary is the 256 byte symbols (no merges): one token per byte."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    chars = sorted(ByteLevel.alphabet())
    specials = ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(specials + chars + [c + "</w>" for c in chars])}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)


def tiny_kandinsky(root: Path) -> tuple[Path, Path]:
    """Directories of a Kandinsky 2.1 prior and decoder with tiny random parts, built as
    diffusers' own tests build them.

    diffusers' tests fetch their tokenizers from the hub; here the prior's CLIP tokenizer is a
    byte-level vocabulary without merges and the decoder's XLM-R tokenizer a SentencePiece unigram
    trained on the world's captions.
    """
    from diffusers import (
        DDIMScheduler,
        KandinskyPipeline,
        KandinskyPriorPipeline,
        PriorTransformer,
        UnCLIPScheduler,
        UNet2DConditionModel,
        VQModel,
    )
    from diffusers.pipelines.kandinsky.text_encoder import MCLIPConfig, MultilingualCLIP
    from transformers import (
        CLIPImageProcessor,
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
        XLMRobertaTokenizer,
    )

    hidden, cross = 32, 32
    clip_tok = byte_clip_tokenizer()
    clip_vocab = clip_tok.get_vocab()
    torch.manual_seed(0)
    text_encoder = CLIPTextModelWithProjection(CLIPTextConfig(
        bos_token_id=0, eos_token_id=1, pad_token_id=1, hidden_size=hidden, projection_dim=hidden,
        intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
        vocab_size=len(clip_vocab), max_position_embeddings=77,
    ))  # fmt: skip
    torch.manual_seed(0)
    prior = PriorTransformer(
        num_attention_heads=2, attention_head_dim=12, embedding_dim=hidden, num_layers=1
    )
    prior.clip_std = torch.nn.Parameter(torch.ones(prior.clip_std.shape))
    torch.manual_seed(0)
    image_encoder = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=hidden, image_size=224, projection_dim=hidden, intermediate_size=37,
        num_attention_heads=4, num_channels=3, num_hidden_layers=2, patch_size=14,
    ))  # fmt: skip
    image_processor = CLIPImageProcessor(
        crop_size=224, do_center_crop=True, do_normalize=True, do_resize=True, resample=3,
        image_mean=[0.48145466, 0.4578275, 0.40821073], size=224,
        image_std=[0.26862954, 0.26130258, 0.27577711],
    )  # fmt: skip
    prior_scheduler = UnCLIPScheduler(
        variance_type="fixed_small_log",
        prediction_type="sample",
        num_train_timesteps=1000,
        clip_sample=True,
        clip_sample_range=10.0,
    )
    prior_pipe = KandinskyPriorPipeline(
        prior=prior,
        image_encoder=image_encoder,
        text_encoder=text_encoder,
        tokenizer=clip_tok,
        scheduler=prior_scheduler,
        image_processor=image_processor,
    )

    en, bn = corpus()
    root.mkdir(parents=True, exist_ok=True)
    sp = _train_spm(en + bn, root / "xlmr", 300)
    skip = {"<unk>"}
    pieces = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    xlmr_vocab = [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    xlmr_vocab += [p for p in pieces if p[0] not in skip] + [("<mask>", 0.0)]
    xlmr_tok = XLMRobertaTokenizer(vocab=xlmr_vocab, model_max_length=77)
    torch.manual_seed(0)
    mclip = MultilingualCLIP(MCLIPConfig(
        numDims=cross, transformerDimensions=hidden, hidden_size=hidden, intermediate_size=37,
        num_attention_heads=4, num_hidden_layers=2, vocab_size=len(xlmr_vocab),
        max_position_embeddings=80,
    )).eval()  # fmt: skip
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        in_channels=4, out_channels=8, addition_embed_type="text_image",
        down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
        up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mid_block_type="UNetMidBlock2DSimpleCrossAttn", block_out_channels=(32, 64),
        layers_per_block=1, encoder_hid_dim=hidden, encoder_hid_dim_type="text_image_proj",
        cross_attention_dim=cross, attention_head_dim=4, resnet_time_scale_shift="scale_shift",
        class_embed_type=None,
    )  # fmt: skip
    torch.manual_seed(0)
    movq = VQModel(
        block_out_channels=[32, 64], down_block_types=["DownEncoderBlock2D", "AttnDownEncoderBlock2D"],
        in_channels=3, latent_channels=4, layers_per_block=1, norm_num_groups=8,
        norm_type="spatial", num_vq_embeddings=12, out_channels=3,
        up_block_types=["AttnUpDecoderBlock2D", "UpDecoderBlock2D"], vq_embed_dim=4,
    )  # fmt: skip
    scheduler = DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="linear",
        beta_start=0.00085,
        beta_end=0.012,
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
        thresholding=False,
    )
    decoder_pipe = KandinskyPipeline(
        text_encoder=mclip, tokenizer=xlmr_tok, unet=unet, scheduler=scheduler, movq=movq
    )
    prior_pipe.save_pretrained(root / "prior")
    decoder_pipe.save_pretrained(root / "decoder")
    return root / "prior", root / "decoder"
