"""A small, real, two-modality corpus for MoT, from data that PyPI packages ship (offline).

Text is UTF-8 bytes of the news articles gensim ships (and, on request, the Wikipedia paragraphs of its test dump:
about 7 times more text, for runs long enough to repeat the news many times over); images are scikit-learn's 8×8 handwritten digits,
quantized to 16 grey levels, 64 tokens each, row-major, between begin- and end-of-image tokens (as Chameleon
and the MoT paper's image setting represent images: discrete tokens inside one interleaved stream):

    ids   0-255  text bytes             } modality 0 ("text")
          256    <bos>   257 <eos>      }
          258    <boi>   259 <eoi>      }
        260-275  image grey levels 0-15   modality 1 ("image")

Documents alternate a text segment and an image and are packed into fixed-length blocks.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from peft_ext.embedded import news_paragraphs, wikipedia_paragraphs

BOS, EOS, BOI, EOI = 256, 257, 258, 259
IMAGE_OFFSET = 260
VOCAB_SIZE = IMAGE_OFFSET + 16
MODALITY_NAMES = ["text", "image"]
MODALITY_VOCAB_RANGES = [[0, IMAGE_OFFSET], [IMAGE_OFFSET, VOCAB_SIZE]]


def digit_images() -> torch.Tensor:
    """(1797, 64) image tokens: scikit-learn's digits (grey levels 0-16) clipped to 16 levels, offset."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:
        raise ImportError('The MoT corpus needs scikit-learn: `pip install "peft-ext[tour]"`.') from err
    levels = torch.as_tensor(load_digits().images, dtype=torch.long).clamp(max=15).reshape(-1, 64)
    return levels + IMAGE_OFFSET


@dataclass
class InterleavedCorpus:
    train: torch.Tensor  # (n_train, seq_len) token ids
    validation: torch.Tensor  # (n_val, seq_len)

    @staticmethod
    def config_kwargs() -> dict:
        """The MoTConfig / LlamaConfig fields this corpus fixes."""
        return {"vocab_size": VOCAB_SIZE, "bos_token_id": BOS, "eos_token_id": EOS, "pad_token_id": EOS}

    @staticmethod
    def mot_kwargs() -> dict:
        return {"num_modalities": 2, "modality_names": MODALITY_NAMES, "modality_vocab_ranges": MODALITY_VOCAB_RANGES}


def model_shape(hidden_size: int, num_layers: int, num_heads: int, max_positions: int) -> dict:
    """The Llama/MoT shape fields that dense and MoT share in the experiments on this corpus: a SwiGLU width of
    about 8/3 of the hidden size, rounded down to a multiple of 64 (at least 64)."""
    return {"hidden_size": hidden_size, "intermediate_size": max(64, int(hidden_size * 8 / 3) // 64 * 64),
            "num_hidden_layers": num_layers, "num_attention_heads": num_heads, "num_key_value_heads": num_heads,
            "max_position_embeddings": max_positions}


def modality_of_tokens(token_ids: torch.Tensor) -> torch.Tensor:
    """0 for text (and the structural tokens), 1 for image tokens, by id."""
    return (token_ids >= IMAGE_OFFSET).long()


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(all parameters, parameters a token goes through); for MoT a token uses one tower of each untied module."""
    from peft_ext.models.mot.modeling_mot import ModalityModuleList

    total = sum(p.numel() for p in model.parameters())
    idle = sum(p.numel() for module in model.modules() if isinstance(module, ModalityModuleList) and module.is_untied
               for tower in list(module)[1:] for p in tower.parameters())
    return total, total - idle


@torch.no_grad()
def validation_loss_by_modality(model, data: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """(text, image) validation loss of any causal LM on corpus blocks: next-token cross-entropy, token-weighted,
    grouped by the modality of the target token (so dense and MoT models are measured the same way)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    totals, counts = torch.zeros(2, device=device), torch.zeros(2, device=device)
    for i in range(0, len(data), batch_size):
        ids = data[i:i + batch_size].to(device)
        logits = model(input_ids=ids).logits[:, :-1]
        targets = ids[:, 1:].reshape(-1)
        losses = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets, reduction="none")
        modality = modality_of_tokens(targets)
        totals.index_add_(0, modality, losses)
        counts.index_add_(0, modality, torch.ones_like(losses))
    model.train(was_training)
    return (totals / counts).cpu()


TEXT_SOURCES = {"news": news_paragraphs, "wikipedia": lambda: wikipedia_paragraphs(limit=None)}


def build_interleaved_corpus(seq_len: int = 256, text_bytes: int = 96, validation_fraction: float = 0.1,
                             seed: int = 0, text_sources: tuple[str, ...] = ("news",)) -> InterleavedCorpus:
    """Pack <bos> text <boi> image <eoi> text <boi> image <eoi> ... <eos> documents into `seq_len` blocks.

    Each article becomes one document; its text is cut into segments of about `text_bytes` bytes, and an
    image (drawn without replacement, cycling) follows each segment. The split is by document, so no
    validation text or image appears in training. `text_sources` picks the articles: "news" (gensim's Lee
    corpus, 300 articles, 0.36 MB) and/or "wikipedia" (4,129 paragraphs, 2.4 MB).
    """
    if seq_len < 80:
        raise ValueError(f"`seq_len` must be at least 80 (an image takes 66 tokens), got {seq_len}.")
    unknown = [name for name in text_sources if name not in TEXT_SOURCES]
    if unknown or not text_sources:
        raise ValueError(f"`text_sources` must be a non-empty subset of {sorted(TEXT_SOURCES)}, got {list(text_sources)}.")
    if not 0 < validation_fraction < 1:
        raise ValueError(f"`validation_fraction` must be in (0, 1), got {validation_fraction}.")
    rng = random.Random(seed)
    images = digit_images()
    image_order = list(range(len(images)))
    rng.shuffle(image_order)
    n_val_images = int(len(images) * validation_fraction)
    image_pools = {"validation": image_order[:n_val_images], "train": image_order[n_val_images:]}

    articles = [article for name in text_sources for article in TEXT_SOURCES[name]()]
    rng.shuffle(articles)
    n_val_articles = max(1, int(len(articles) * validation_fraction))
    splits = {"validation": articles[:n_val_articles], "train": articles[n_val_articles:]}

    blocks = {}
    for split, docs in splits.items():
        pool, cursor, stream = image_pools[split], 0, []
        for doc in docs:
            data = doc.encode("utf-8")
            stream.append(BOS)
            for start in range(0, len(data), text_bytes):
                stream.extend(data[start:start + text_bytes])
                stream.extend([BOI, *images[pool[cursor % len(pool)]].tolist(), EOI])
                cursor += 1
            stream.append(EOS)
        usable = len(stream) // seq_len * seq_len
        blocks[split] = torch.tensor(stream[:usable], dtype=torch.long).reshape(-1, seq_len)
    return InterleavedCorpus(train=blocks["train"], validation=blocks["validation"])
