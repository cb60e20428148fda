"""The frozen parts of a text-conditioned diffusion model, for :mod:`models.text_diffusion`.

- :func:`load_pretrained_pipeline`: a local Stable Diffusion 1.x / 2.x (or suite pixel-space)
  pipeline folder, every failure one :class:`~lit.errors.UserError` line;
- :func:`load_text_encoder_folder`: a CLIP text encoder and tokenizer from a folder with
  ``text_encoder/`` and ``tokenizer/`` (a pipeline's layout) or from a CLIP model folder;
- :func:`build_text_encoder`: the small text encoder the suite builds offline from the training
  captions' words (a CLIP BPE tokenizer trained on them, a random CLIP text encoder);
- :func:`tokenizer_files` / :func:`tokenizer_from_files`: a tokenizer as text, for checkpoints;
- :func:`encode_captions`: captions to the hidden states the UNet attends to, as Stable Diffusion
  encodes prompts (padded to the tokenizer's length, last hidden state);
- :func:`fingerprint`: two sums that tell whether a frozen module has the weights it had.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from torch import Tensor, nn
from transformers import CLIPTextModel, CLIPTokenizer

from lit.errors import UserError
from models.text_pipeline import load_text_pipeline
from models.tiny_text2image import tiny_clip_text_encoder, train_clip_tokenizer

TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json")
TEXT_FOLDER_LAYOUT = ("a folder with text_encoder/ and tokenizer/ (a pipeline's layout), "
                      "or a CLIP model folder (config.json, weights and tokenizer files)")


def _first_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:300]}" if text else type(error).__name__


def load_pretrained_pipeline(folder: str | Path) -> DiffusionPipeline:
    """The pipeline in a local folder (:func:`models.text_pipeline.load_text_pipeline`); a folder that
    is missing, incomplete or whose weights do not load ends in one UserError line naming it."""
    try:
        return load_text_pipeline(folder)
    except UserError as error:
        raise UserError(f"pretrained: {error}") from error
    except Exception as error:  # a damaged weights file raises the reader's own error type
        raise UserError(f"pretrained: {folder}: could not load the pipeline ({_first_line(error)})") from error


def load_text_encoder_folder(folder: str | Path) -> tuple[CLIPTextModel, CLIPTokenizer]:
    """A CLIP text encoder and its tokenizer from ``folder`` (:data:`TEXT_FOLDER_LAYOUT`), local files only."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise UserError(f"text_encoder: {root}: no such folder (expected {TEXT_FOLDER_LAYOUT})")
    encoder_dir, tokenizer_dir = (root / "text_encoder", root / "tokenizer") if (root / "text_encoder").is_dir() else (root, root)
    if not (encoder_dir / "config.json").is_file():
        raise UserError(f"text_encoder: {encoder_dir} has no config.json (expected {TEXT_FOLDER_LAYOUT})")
    if not any((tokenizer_dir / name).is_file() for name in TOKENIZER_FILES):
        raise UserError(f"text_encoder: {tokenizer_dir} has no tokenizer files ({', '.join(TOKENIZER_FILES)}; "
                        f"expected {TEXT_FOLDER_LAYOUT})")
    try:
        encoder = CLIPTextModel.from_pretrained(encoder_dir, local_files_only=True)
        tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir, local_files_only=True)
    except Exception as error:
        raise UserError(f"text_encoder: {root}: could not load a CLIP text encoder and tokenizer "
                        f"({_first_line(error)})") from error
    return encoder, tokenizer


def build_text_encoder(words: Iterable[str], *, width: int, layers: int, max_tokens: int, vocab_size: int,
                       seed: int) -> tuple[CLIPTextModel, CLIPTokenizer]:
    """The suite's offline text encoder: a CLIP tokenizer trained on ``words`` and a random CLIP text
    encoder of ``width`` and ``layers`` drawn from ``seed`` (torch's global generator is left as it was)."""
    tokenizer = train_clip_tokenizer(sorted(set(words)), max_length=max_tokens, vocab_size=vocab_size)
    return suite_text_encoder(tokenizer, width=width, layers=layers, seed=seed), tokenizer


def suite_text_encoder(tokenizer: CLIPTokenizer, *, width: int, layers: int, seed: int) -> CLIPTextModel:
    """The suite's random CLIP text encoder for ``tokenizer`` (torch's global generator is left as it was)."""
    if width % 4:
        raise ValueError(f"the suite's text encoder has 4 attention heads: its width (cross_attention_dim) "
                         f"must divide by 4, got {width}")
    with torch.random.fork_rng(devices=[]):
        return tiny_clip_text_encoder(tokenizer, hidden_size=width, layers=layers, seed=seed)


def tokenizer_files(tokenizer: CLIPTokenizer) -> dict[str, str]:
    """Every file ``save_pretrained`` writes for ``tokenizer``, name -> text."""
    with tempfile.TemporaryDirectory() as scratch:
        tokenizer.save_pretrained(scratch)
        return {path.name: path.read_text(encoding="utf-8") for path in sorted(Path(scratch).iterdir()) if path.is_file()}


def tokenizer_from_files(files: dict[str, str]) -> CLIPTokenizer:
    """The tokenizer :func:`tokenizer_files` described."""
    with tempfile.TemporaryDirectory() as scratch:
        for name, text in files.items():
            (Path(scratch) / Path(name).name).write_text(text, encoding="utf-8")
        return CLIPTokenizer.from_pretrained(scratch, local_files_only=True)


def encode_captions(tokenizer: CLIPTokenizer, text_encoder: nn.Module, captions: Sequence[str],
                    device: torch.device) -> Tensor:
    """Last hidden states ``(len(captions), tokenizer length, width)``, padded and truncated to the
    tokenizer's ``model_max_length`` as ``StableDiffusionPipeline`` and ``PixelTextToImagePipeline`` encode prompts."""
    ids = tokenizer(list(captions), padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    return text_encoder(ids.to(device))[0]


@torch.no_grad()
def fingerprint(module: nn.Module) -> list[float]:
    """``[sum, sum of absolute values]`` of all the module's parameters and buffers, in float64."""
    tensors = [t.detach().double() for t in (*module.parameters(), *module.buffers()) if t.is_floating_point()]
    return [float(sum(t.sum() for t in tensors)), float(sum(t.abs().sum() for t in tensors))]


def same_fingerprint(a: Sequence[float], b: Sequence[float], rtol: float = 1e-5) -> bool:
    """Whether two :func:`fingerprint` values agree (summation order may change the last digits)."""
    return len(a) == len(b) and all(abs(x - y) <= rtol * max(abs(x), abs(y), 1.0) for x, y in zip(a, b))
