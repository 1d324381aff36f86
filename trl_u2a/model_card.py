"""The model card of a U2A run: TRL's card with the base model named, the Quick start pointing at the trained model, a
U2A section (configuration from the dataclass, selection, weights, J at the start and after training) and the U2A
citation once."""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import os
import re
from typing import TYPE_CHECKING

import torch

from .config import U2AConfig
from .core.weighting import weight_entropy

if TYPE_CHECKING:
    from .trainer import U2ATrainer


def write_model_card(trainer: U2ATrainer, model_name=None, dataset_name=None, tags=None) -> None:
    """TRL's model card, with the base model named (TRL's writes "[None](https://huggingface.co/None)" for a local
    path), the Quick start pointing at this model, a U2A section (configuration, selection, weights, J at the start
    and after training) and the U2A citation once."""
    if not trainer.is_world_process_zero():
        return
    from trl.trainer.utils import generate_model_card, get_comet_experiment_url, get_trackio_space_url

    config = trainer.accelerator.unwrap_model(trainer.model).config
    base = str(getattr(config, "_name_or_path", "") or "")
    on_hub = bool(re.fullmatch(r"[\w.-]+(/[\w.-]+)?", base)) and not os.path.exists(base)
    if on_hub:
        base_text = f"[{base}](https://huggingface.co/{base})"
    elif base:
        base_text = f"the local model `{base}`"
    else:
        base_text = "a model built in memory (it has no name or path)"
    # The Quick start loads this model: its Hub id once pushed, else the directory it is saved in
    model_ref = getattr(trainer, "hub_model_id", None) or trainer.args.hub_model_id or trainer.args.output_dir
    tags = {tags} if isinstance(tags, str) else set(tags or ())
    tags.update(trainer._tag_names)
    wandb_url = None
    with contextlib.suppress(ImportError, AttributeError):
        import wandb

        wandb_url = wandb.run.url if wandb.run is not None else None
    placeholder = "U2A_BASE_MODEL"
    card = generate_model_card(
        base_model=placeholder,
        model_name=model_name,
        hub_model_id=model_ref,
        dataset_name=dataset_name,
        tags=sorted(tags),
        wandb_url=wandb_url,
        trackio_url=get_trackio_space_url(),
        comet_url=get_comet_experiment_url(),
        trainer_name=trainer._name,
        trainer_citation=trainer._paper["citation"],
        paper_title=trainer._paper["title"],
        paper_id=trainer._paper["id"],
    )
    # The card's metadata takes a Hub id only (the Hub rejects a local path there)
    card.data.base_model = base if on_hub else None
    text = card.text.replace(f"[{placeholder}](https://huggingface.co/{placeholder})", base_text)
    text = text.replace(placeholder, base or "model")
    section = u2a_card_section(trainer)
    text = text.replace("## Citations", section + "\n## Citations", 1) if "## Citations" in text else text + section
    card.text = text
    card.save(os.path.join(trainer.args.output_dir, "README.md"))


def u2a_card_section(trainer: U2ATrainer) -> str:
    """Markdown: what U2A unlearned and how (appended to the model card)."""
    args = trainer.args
    w = trainer.weight_state.weights
    selected = w[w > 0]
    # Every option U2AConfig declares itself (its own knobs and the TRL defaults it overrides), in its order,
    # so a new option reaches the card without a list to keep in step; output switches say nothing of the model
    own = inspect.get_annotations(U2AConfig)
    fields = [f.name for f in dataclasses.fields(U2AConfig) if f.name in own and f.name != "save_refresh_plots"]
    rows = "\n".join(f"| `{name}` | `{getattr(args, name)}` |" for name in fields)
    lines = [
        "",
        "## U2A: what was unlearned",
        "",
        f"Trained with [trl-u2a](https://arxiv.org/abs/{trainer._paper['id']}) (`U2ATrainer`) for "
        f"{trainer.state.global_step} optimizer steps.",
        "",
        "| setting | value |",
        "|---|---|",
        rows,
        "",
        f"- Negatives: {trainer.num_negatives}; selected at the end: {len(selected)} (budget {_budget(trainer)}).",
    ]
    if len(selected):
        q = torch.quantile(selected, torch.tensor([0.0, 0.5, 1.0], dtype=selected.dtype)).tolist()
        lines.append(
            f"- Weights of the selected negatives: min {q[0]:.3g}, median {q[1]:.3g}, max {q[2]:.3g}, "
            f"entropy {weight_entropy(selected):.3g} nats (uniform: {math.log(len(selected)):.3g})."
        )
    if trainer.refresh_callback is not None and trainer.refresh_callback.history:
        history = trainer.refresh_callback.history
        # The record marked final is J after training (measured after the last refresh); without one (training
        # ended on a refresh step, or the card is written mid-run) the last refresh's J is the latest known
        last = next((r for r in reversed(history) if r.get("final")), history[-1])
        when = "after training" if last.get("final") else "at the last refresh"
        lines.append(
            f"- Refreshes: {sum(r.get('refresh') is not None for r in history)}; alignment objective J (DPO loss "
            f"on the alignment set): {history[0]['objective']:.4f} at the start, {last['objective']:.4f} {when} "
            f"(step {last['step']})."
        )
    else:
        lines.append("- No alignment set: plain weighted unlearning, no selection.")
    lines.append("")
    return "\n".join(lines)


def _budget(trainer) -> str:
    """The budget the selection used: the numeric one, or the count `auto_budget` found and its cap."""
    controller = getattr(trainer.refresh_callback, "controller", None)
    found = getattr(controller, "auto_budget", None)
    return str(trainer.budget) if found is None else f"{found}, set by auto_budget; cap {trainer.budget}"
