"""Contrastive reranking (paper §2.6): score N candidate images against their caption and keep the best.

The scorer is a ``transformers.CLIPModel`` loaded from a local folder in the standard Hugging Face layout (model,
tokenizer, image-processor configs): either a pretrained CLIP the user points to, or one trained by
``launch/train_clip.py`` on the project's own data (saved in the same layout, so both load the same way). Nothing is
fetched from a hub.

A CLIP text tower pools the hidden state at the end-of-text token. Our caption tokenizer's ``<eos>`` has id 2, which
transformers' CLIP treats as a legacy config and then pools at the *largest* id instead, so the CLIP built here gets
a dedicated end-of-text token appended at the top of the vocabulary (``<|endoftext|>``, id = BPE vocabulary size)
and a post-processor that writes ``<bos> caption <|endoftext|>``.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from dalle_ds.config import ClipModelConfig
from dalle_ds.utils.errors import first_line

END_OF_TEXT = "<|endoftext|>"
MARKER = "dalle_ds_clip.json"


def clip_tokenizer_from_caption_tokenizer(caption_tokenizer, text_len: int):
    """A ``PreTrainedTokenizerFast`` for CLIP made from our BPE: same merges and normalization, plus <|endoftext|>."""
    from tokenizers import Tokenizer
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    base = caption_tokenizer.hf.backend_tokenizer
    tok = Tokenizer.from_str(base.to_str())
    tok.no_padding()
    tok.no_truncation()
    vocab = tok.get_vocab_size()
    tok.add_special_tokens([END_OF_TEXT])
    eot = tok.token_to_id(END_OF_TEXT)
    assert eot == vocab, "the end-of-text token must sit at the top of the vocabulary"
    tok.post_processor = TemplateProcessing(single=f"<bos> $A {END_OF_TEXT}",
                                            special_tokens=[("<bos>", tok.token_to_id("<bos>")), (END_OF_TEXT, eot)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token=END_OF_TEXT,
                                   pad_token="<pad>", unk_token="<unk>", model_max_length=text_len)


def build_clip(cfg: ClipModelConfig, tokenizer):
    """A fresh ``CLIPModel`` whose text tower matches ``tokenizer`` (from :func:`clip_tokenizer_from_caption_tokenizer`)."""
    from transformers import CLIPConfig, CLIPModel

    text = dict(vocab_size=len(tokenizer), hidden_size=cfg.width, intermediate_size=4 * cfg.width,
                num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads, max_position_embeddings=cfg.text_len,
                projection_dim=cfg.projection_dim, pad_token_id=tokenizer.pad_token_id,
                bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    vision = dict(image_size=cfg.image_size, patch_size=cfg.patch_size, hidden_size=cfg.width,
                  intermediate_size=4 * cfg.width, num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
                  projection_dim=cfg.projection_dim, num_channels=3)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=cfg.projection_dim,
                                 logit_scale_init_value=cfg.logit_scale_init))
    if cfg.vision_position_init == "sincos2d":
        table = model.vision_model.embeddings.position_embedding.weight
        with torch.no_grad():
            table.zero_()  # row 0 is the class token's: no place on the grid
            table[1:] = sincos2d_table(cfg.image_size // cfg.patch_size, cfg.width).to(table.dtype)
    return model


def sincos2d_table(grid: int, dim: int, base: float = 10000.0) -> torch.Tensor:
    """[grid², dim] row-major patch positions: the first half of ``dim`` encodes the row, the second the column, each
    as sin/cos of the index at ``dim / 4`` geometric frequencies (MAE's 2-D table, He et al. 2022). Unlike
    transformers' N(0, 0.02²) start, its entries are O(1), as large as the patch content after the pre-layernorm, so
    the class token sees where things are from the first update."""
    if dim % 4:
        raise ValueError(f"a 2-D sin/cos table needs dim divisible by 4, got {dim}")
    freqs = base ** -(torch.arange(dim // 4, dtype=torch.float64) / (dim // 4))
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                                indexing="ij")
    parts = []
    for coord in (rows, cols):
        angle = coord.reshape(-1, 1) * freqs
        parts += [angle.sin(), angle.cos()]
    return torch.cat(parts, dim=1).float()


def image_processor_for(image_size: int):
    from transformers import CLIPImageProcessor

    # Mean/std 0.5: our images are synthetic; any fixed affine map works for a model trained here.
    return CLIPImageProcessor(do_resize=True, size={"shortest_edge": image_size}, do_center_crop=True,
                              crop_size={"height": image_size, "width": image_size}, do_rescale=True,
                              rescale_factor=1 / 255, do_normalize=True, image_mean=[0.5] * 3, image_std=[0.5] * 3)


class ClipReranker:
    """Scores (image, caption) pairs with a CLIP from a local folder; higher is better."""

    def __init__(self, model, tokenizer, image_processor, device: torch.device | str = "cpu"):
        self.model = model.to(device).eval()
        self.tokenizer, self.processor, self.device = tokenizer, image_processor, torch.device(device)
        crop = getattr(image_processor, "crop_size", None) or {}
        self.image_size = int(crop.get("height", model.config.vision_config.image_size))
        self.text_len = int(min(getattr(tokenizer, "model_max_length", 77) or 77,
                                model.config.text_config.max_position_embeddings))

    @classmethod
    def from_pretrained(cls, path: str | Path, device: torch.device | str = "cpu") -> "ClipReranker":
        from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

        p = Path(path)
        if not (p / "config.json").is_file():
            raise FileNotFoundError(f"{p} is not a CLIP folder (no config.json); train one with "
                                    "launch/train_clip.py or point to a local pretrained CLIP")
        try:
            model = CLIPModel.from_pretrained(p, local_files_only=True)
            tokenizer = AutoTokenizer.from_pretrained(p, local_files_only=True)
            processor = CLIPImageProcessor.from_pretrained(p, local_files_only=True)
        except (OSError, ValueError, KeyError) as e:  # transformers: a damaged config.json, no weights, no tokenizer
            raise ValueError(f"CLIP folder {p}: transformers could not load it ({first_line(e, 240)})") from e
        return cls(model, tokenizer, processor, device)

    def save(self, path: str | Path, extra: dict | None = None) -> None:
        p = Path(path)
        p.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(p)
        self.tokenizer.save_pretrained(p)
        self.processor.save_pretrained(p)
        (p / MARKER).write_text(json.dumps(extra or {}, indent=2) + "\n")

    def text_inputs(self, captions: list[str]) -> dict[str, torch.Tensor]:
        # Padded to the longest caption, not to text_len: the text tower pools at <|endoftext|>, and short shapes
        # captions in 32 positions spent most of its work on padding.
        enc = self.tokenizer(list(captions), padding="longest", truncation=True, max_length=self.text_len,
                             return_tensors="pt")
        return {"input_ids": enc["input_ids"].to(self.device), "attention_mask": enc["attention_mask"].to(self.device)}

    def pixel_values(self, images: torch.Tensor | list) -> torch.Tensor:
        """uint8 [B, 3, H, W] (or float in [0, 1]) → normalized pixel values for the vision tower."""
        x = images if isinstance(images, torch.Tensor) else torch.stack(list(images))
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        if x.shape[-1] == self.image_size and x.shape[-2] == self.image_size and self._is_simple_processor():
            mean = torch.tensor(self.processor.image_mean, device=x.device).view(1, 3, 1, 1)
            std = torch.tensor(self.processor.image_std, device=x.device).view(1, 3, 1, 1)
            return ((x - mean) / std).to(self.device)
        arrays = [np.asarray((im.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu()) for im in x]
        return self.processor(images=arrays, return_tensors="pt")["pixel_values"].to(self.device)

    def _is_simple_processor(self) -> bool:
        p = self.processor
        return bool(p.do_rescale and abs(p.rescale_factor - 1 / 255) < 1e-12 and p.do_normalize)

    @torch.no_grad()
    def image_embeddings(self, images) -> torch.Tensor:
        out = self.model.get_image_features(pixel_values=self.pixel_values(images))
        emb = out if isinstance(out, torch.Tensor) else out.pooler_output
        return torch.nn.functional.normalize(emb.float(), dim=-1)

    @torch.no_grad()
    def text_embeddings(self, captions: list[str]) -> torch.Tensor:
        out = self.model.get_text_features(**self.text_inputs(captions))
        emb = out if isinstance(out, torch.Tensor) else out.pooler_output
        return torch.nn.functional.normalize(emb.float(), dim=-1)

    @torch.no_grad()
    def score(self, images, captions: list[str]) -> torch.Tensor:
        """Cosine similarity of each image with its own caption, [B]."""
        return (self.image_embeddings(images) * self.text_embeddings(captions)).sum(-1)

    def rerank(self, images, caption: str, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Candidates of one caption → (indices of the best ``keep`` by score, all scores). The caption goes through
        the text tower once, not once per candidate."""
        with torch.no_grad():
            scores = self.image_embeddings(images) @ self.text_embeddings([caption])[0]
        return torch.argsort(scores, descending=True)[:keep], scores


def marker(path: str | Path) -> dict | None:
    f = Path(path) / MARKER
    return json.loads(f.read_text()) if f.is_file() else None


def config_dict(cfg: ClipModelConfig) -> dict:
    return asdict(cfg)
