"""The model card names the base model, cites U2A once and reports J after training, not before the last refresh."""

from conftest import CHOSEN, PROMPTS, REJECTED, cpu_args
from datasets import Dataset

from trl_u2a import U2ATrainer


def test_model_card_names_the_base_cites_once_and_reports_the_final_objective(tiny_model_path, tmp_path):
    negatives = Dataset.from_dict({"prompt": PROMPTS + PROMPTS, "completion": REJECTED + CHOSEN})
    alignment = Dataset.from_dict({"prompt": PROMPTS, "chosen": CHOSEN, "rejected": REJECTED})
    # A checkpoint at the last step: TRL writes the card there, before on_train_end measures the final J
    args = cpu_args(tmp_path, budget=6, reweight_steps=3, max_steps=4, save_strategy="steps", save_steps=4)
    trainer = U2ATrainer(model=tiny_model_path, args=args, train_dataset=negatives, alignment_dataset=alignment)
    trainer.train()
    final = trainer.refresh_callback.history[-1]
    assert final.get("final") and final["step"] == 4

    card = (tmp_path / "README.md").read_text()  # no save_model: the card of the run as train() leaves it
    assert f"fine-tuned version of the local model `{tiny_model_path}`" in card
    assert "[None]" not in card and 'model="None"' not in card and "base_model:" not in card
    assert f'pipeline("text-generation", model="{tmp_path}"' in card
    assert card.count("@article{feng2025u2a") == 1
    assert f"{final['objective']:.4f} after training (step 4)" in card
    assert card.index("## U2A: what was unlearned") < card.index("## Citations")

    trainer.save_model(str(tmp_path / "final"))
    assert (tmp_path / "final" / "README.md").read_text().count("@article{feng2025u2a") == 1

    # A Hub id is linked and goes into the card's metadata
    trainer.model.config._name_or_path = "Qwen/Qwen2.5-0.5B-Instruct"
    trainer.create_model_card(model_name="x")
    card = (tmp_path / "README.md").read_text()
    assert "[Qwen/Qwen2.5-0.5B-Instruct](https://huggingface.co/Qwen/Qwen2.5-0.5B-Instruct)" in card
    assert "base_model: Qwen/Qwen2.5-0.5B-Instruct" in card
