"""Small text-to-image components built offline: a CLIP tokenizer trained on a word list, a CLIP
text encoder, a conditional UNet, a VAE, and whole pipeline folders made of them.

They serve the tests, the README's end-to-end example, the CPU benchmarks and the CPU demo of
text-conditioned training: everything a Stable Diffusion folder has, in a few hundred kilobytes,
written with the libraries' own classes (``transformers`` and ``diffusers``; the BPE merges are
trained here, deterministically), so nothing is ever downloaded. Weights are random, drawn from
``torch.manual_seed(seed)``: the same seed writes the same folder.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from models.text_pipeline import PixelTextToImagePipeline

#: Words every tiny tokenizer knows besides the caller's (colours, shapes, places: the procedural captions).
BASE_WORDS: tuple[str, ...] = tuple(
    "a an the of on in at with and above below left right beside photo painting picture image "
    "red green blue yellow orange purple pink white black gray brown cyan magenta "
    "circle square triangle star disk ring stripe background small large big tiny".split()
)
ALPHABET = list("abcdefghijklmnopqrstuvwxyz0123456789.,!?'-")
START_TOKEN, END_TOKEN = "<|startoftext|>", "<|endoftext|>"
#: What a word is when merges are trained (the ``Whitespace`` pre-tokenizer of ``tokenizers``).
WORD_PATTERN = re.compile(r"\w+|[^\w\s]+")


def train_clip_tokenizer(words: Iterable[str] = (), *, max_length: int = 16, vocab_size: int = 400) -> CLIPTokenizer:
    """A CLIP tokenizer whose BPE merges are trained on ``BASE_WORDS`` and ``words`` (lower-cased).

    Any text tokenizes (unknown words fall back to letters); ``max_length`` is the model's
    context length, including the start and end tokens. The same words give the same tokenizer,
    in every call and process (:func:`bpe_merges` breaks ties by the pair itself), so that DDP ranks
    and resumed runs that build it agree."""
    counts = Counter(piece for text in [*BASE_WORDS, *words] for piece in WORD_PATTERN.findall(text.lower()))
    alphabet = sorted(set(ALPHABET) | {char for word in counts for char in word})
    vocab = [START_TOKEN, END_TOKEN] + alphabet + [f"{char}</w>" for char in alphabet]
    merges = bpe_merges(counts, max(vocab_size - len(vocab), 0))
    vocab += [left + right for left, right in merges]
    with tempfile.TemporaryDirectory() as scratch:
        (Path(scratch) / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
        (Path(scratch) / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
        tokenizer = CLIPTokenizer(f"{scratch}/vocab.json", f"{scratch}/merges.txt", model_max_length=max_length)
        tokenizer.model_max_length = max_length
        # CLIPTokenizer reads its files lazily at most once; a round trip through save_pretrained keeps it self-contained
        tokenizer.save_pretrained(f"{scratch}/tokenizer")
        return CLIPTokenizer.from_pretrained(f"{scratch}/tokenizer", local_files_only=True)


def bpe_merges(counts: Counter[str], budget: int) -> list[tuple[str, str]]:
    """Byte-pair-encoding merges (Sennrich et al.) of words with their counts: up to ``budget`` times, merge
    the most frequent adjacent pair of symbols, ties broken by the smaller pair (so the result depends on
    the counts only). A word's last symbol carries the end-of-word suffix ``</w>``."""
    symbols = {word: [*word[:-1], word[-1] + "</w>"] for word in sorted(counts) if word}
    pairs: Counter[tuple[str, str]] = Counter()
    holders: dict[tuple[str, str], set[str]] = {}
    for word, parts in symbols.items():
        for pair in zip(parts, parts[1:]):
            pairs[pair] += counts[word]
            holders.setdefault(pair, set()).add(word)
    merges: list[tuple[str, str]] = []
    while len(merges) < budget and pairs:
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        for word in sorted(holders.pop(best, ())):
            parts = symbols[word]
            for pair in zip(parts, parts[1:]):
                pairs[pair] -= counts[word]
                if pairs[pair] <= 0:
                    del pairs[pair]
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            symbols[word] = merged
            for pair in zip(merged, merged[1:]):
                pairs[pair] += counts[word]
                holders.setdefault(pair, set()).add(word)
    return merges


def tiny_clip_text_encoder(tokenizer: CLIPTokenizer, *, hidden_size: int = 32, layers: int = 2, seed: int = 0) -> CLIPTextModel:
    """A random CLIP text encoder sized for ``tokenizer`` (its vocabulary and context length)."""
    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return CLIPTextModel(config).eval()


def tiny_unet(*, channels: int, sample_size: int, cross_attention_dim: int = 32,
              block_out_channels: tuple[int, ...] = (16, 32), seed: int = 0) -> UNet2DConditionModel:
    """A random two-level conditional UNet (one cross-attention level) with ``channels`` in and out."""
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=channels, out_channels=channels, layers_per_block=1,
        block_out_channels=block_out_channels, norm_num_groups=min(8, block_out_channels[0]),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=4,
    ).eval()


def tiny_vae(*, seed: int = 0) -> AutoencoderKL:
    """A random VAE with 4 latent channels and one down-sampling step (latents are half the image size)."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16), norm_num_groups=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    ).eval()


def sd_scheduler() -> DDIMScheduler:
    """DDIM with Stable Diffusion 1.x's noise schedule (scaled linear, 0.00085-0.012)."""
    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def tiny_sd_pipeline(*, image_size: int = 32, words: Iterable[str] = (), seed: int = 0) -> StableDiffusionPipeline:
    """A random Stable Diffusion 1.x-layout pipeline (unet, vae, text_encoder, tokenizer, scheduler; no safety checker)."""
    tokenizer = train_clip_tokenizer(words)
    text_encoder = tiny_clip_text_encoder(tokenizer, seed=seed)
    vae = tiny_vae(seed=seed + 1)
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    unet = tiny_unet(channels=4, sample_size=image_size // scale,
                     cross_attention_dim=text_encoder.config.hidden_size, seed=seed + 2)
    return StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=sd_scheduler(),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def tiny_pixel_pipeline(*, image_size: int = 32, words: Iterable[str] = (), seed: int = 0) -> PixelTextToImagePipeline:
    """A random pixel-space text-to-image pipeline of the suite's own kind (no VAE)."""
    tokenizer = train_clip_tokenizer(words)
    text_encoder = tiny_clip_text_encoder(tokenizer, seed=seed)
    unet = tiny_unet(channels=3, sample_size=image_size, cross_attention_dim=text_encoder.config.hidden_size, seed=seed + 2)
    return PixelTextToImagePipeline(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=sd_scheduler())


def write_tiny_sd_pipeline(folder: str | Path, *, image_size: int = 32, words: Iterable[str] = (), seed: int = 0) -> Path:
    """Save :func:`tiny_sd_pipeline` as a diffusers folder (``model_index.json`` and one folder per component)."""
    folder = Path(folder)
    tiny_sd_pipeline(image_size=image_size, words=words, seed=seed).save_pretrained(folder)
    return folder


def write_tiny_pixel_pipeline(folder: str | Path, *, image_size: int = 32, words: Iterable[str] = (), seed: int = 0) -> Path:
    """Save :func:`tiny_pixel_pipeline` as a diffusers folder."""
    folder = Path(folder)
    tiny_pixel_pipeline(image_size=image_size, words=words, seed=seed).save_pretrained(folder)
    return folder
