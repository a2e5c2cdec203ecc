"""Model cards for every method, rendered from the templates in `hub_cards/`.

The templates are Jinja files rendered by `huggingface_hub.ModelCard.from_template`; their
YAML front matter comes from a `ModelCardData` built here, so the Hub metadata (library,
base model, pipeline tag, license, tags, arXiv id) is right by construction. `save_pretrained`
and `push_to_hub` of every method write the card beside the weights.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from importlib.resources import files

from huggingface_hub import HfApi, ModelCard, ModelCardData

from peft_ext.serialization import atomic_write_text


@dataclass(frozen=True)
class MethodCard:
    """What the Hub needs to know about one method."""

    template: str  # file name in hub_cards/, without ".md"
    method: str  # tag, e.g. "nola"
    title: str
    arxiv: str
    library_name: str  # "peft" for tuners, "transformers" for models
    license: str = "apache-2.0"


METHOD_CARDS: dict[str, MethodCard] = {
    card.template: card
    for card in (
        MethodCard("nola", "nola", "NOLA: Compressing LoRA using Linear Combination of Random Basis", "2310.02556", "peft"),
        MethodCard("mixda", "mixda", "Mixture-of-Domain-Adapters", "2306.05406", "peft"),
        MethodCard("longmem", "longmem", "Augmenting Language Models with Long-Term Memory", "2306.07174", "transformers"),
        MethodCard("mot", "mot", "Mixture-of-Transformers", "2411.04996", "transformers"),
        MethodCard("leyolo", "leyolo", "LeYOLO: New Scalable and Efficient CNN Architecture for Object Detection", "2406.14239", "transformers"),
    )
}


def template_text(template: str) -> str:
    if template not in METHOD_CARDS:
        raise ValueError(f"`template` must be one of {sorted(METHOD_CARDS)}, got {template!r}.")
    return files("peft_ext").joinpath("hub_cards", f"{template}.md").read_text(encoding="utf-8")


def render_model_card(
    template: str,
    *,
    base_model: str | None = None,
    pipeline_tag: str | None = None,
    repo_id: str | None = None,
    extra_tags: list[str] | None = None,
    **context,
) -> ModelCard:
    """Render the card of one method.

    `context` holds the template's own variables (e.g. `config`, a dict of the saved config).
    """
    card = METHOD_CARDS.get(template)
    if card is None:
        raise ValueError(f"`template` must be one of {sorted(METHOD_CARDS)}, got {template!r}.")
    tags = ["peft-ext", card.method, f"arxiv:{card.arxiv}", *(extra_tags or [])]
    data = ModelCardData(
        library_name=card.library_name,
        base_model=base_model,
        pipeline_tag=pipeline_tag,
        license=card.license,
        tags=list(dict.fromkeys(tags)),
    )
    return ModelCard.from_template(
        data,
        template_str=template_text(template),
        title=card.title,
        arxiv=card.arxiv,
        repo_id=repo_id or "<your-username>/<repo>",
        base_model_id=base_model or "<base-model-id>",
        **context,
    )


def save_model_card(card: ModelCard, output_dir: str | os.PathLike) -> None:
    atomic_write_text(os.path.join(output_dir, "README.md"), str(card))


def push_folder_to_hub(save_to: Callable[[str], None], repo_id: str, *, private: bool | None = None,
                       token: str | None = None, commit_message: str | None = None, revision: str | None = None,
                       create_pr: bool = False, **_ignored):
    """Create `repo_id` if needed, call `save_to(tmp_dir)` and upload that folder as one commit.

    transformers' `push_to_hub` replaces the README.md that `save_pretrained` wrote with the remote or a
    generic card; uploading the saved folder as it is keeps our card.
    """
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as tmp_dir:
        save_to(tmp_dir)
        return api.upload_folder(repo_id=repo_id, folder_path=tmp_dir, commit_message=commit_message or "Upload with peft-ext",
                                 revision=revision, create_pr=create_pr)


def push_model_to_hub(model, repo_id: str, **kwargs):
    """Upload a transformers model of ours as one commit: `model.save_pretrained` into a temporary folder, then
    `model._write_model_card(folder, repo_id=repo_id)` (so the card names the repository), then the upload."""

    def save_to(folder: str) -> None:
        model.save_pretrained(folder)
        model._write_model_card(folder, repo_id=repo_id)

    return push_folder_to_hub(save_to, repo_id, **kwargs)


def write_peft_model_card(peft_model, output_dir: str, template: str) -> None:
    """Write the card of a `PeftModel` whose adapter is one of our tuner types."""
    from peft import PeftModelForCausalLM

    base = peft_model.get_base_model()
    base_model = getattr(getattr(base, "config", None), "_name_or_path", None) or None
    config = peft_model.peft_config[peft_model.active_adapter].to_dict()
    trainable, total = peft_model.get_nb_trainable_parameters()
    card = render_model_card(
        template,
        base_model=base_model,
        pipeline_tag="text-generation" if isinstance(peft_model, PeftModelForCausalLM) else None,
        config={k: v for k, v in sorted(config.items()) if v is not None},
        trainable_params=trainable,
        total_params=total,
    )
    save_model_card(card, output_dir)
