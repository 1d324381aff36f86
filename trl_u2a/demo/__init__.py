"""The offline benchmark behind `trl-u2a demo`: does U2A beat uniform unlearning on a task where we know the answer?

Pipeline, per seed (the U2A paper's evaluation, arXiv:2504.06659, at toy scale, on CPU, no download):

1. Data: the seeded synthetic assistant task (`trl_u2a.synthetic.make_training_splits`): negatives of three kinds
   (`harmful`, `low_quality`, `near_copy`; half harmful, or `harmful_share` of them), chosen answers, a held-out
   alignment set, test prompts and test pairs.
2. Start model: a tiny Llama built from config, trained from scratch with TRL's `SFTTrainer` on the `original` mix
   (about 65 % rejected answers), so that it is misaligned: it insults the user on a clearly non-zero share of the
   test prompts. Its train NLL must stay well above zero: a model that has memorised its negatives gives near-zero
   gradients on them and noise influence scores (docs/troubleshooting.md). Cached on disk, keyed by its settings and
   the data.
3. Methods, each for the same number of optimizer steps from the same start model, in each setting (`full`: full
   fine-tuning; `lora`: a LoRA adapter, r 8, alpha 16, every linear layer) at each of its learning rates:
   - `u2a`: `U2ATrainer` with the alignment set (selection + tempered reweighting) at the package defaults of
     `U2AConfig` (the demo passes no knob unless `u2a_overrides` or a variant does), for each loss `ga/npo/simnpo`;
   - `u2a-select`: selection only (`weight_lr=0`); `u2a-fisher`: the diagonal-Fisher preconditioner; `u2a-w{η}`:
     other weight temperatures; `u2a-untempered`: `η_w=1` with no clip and no cap (the paper code's update, sign
     fixed); `u2a-b{b}`: other budgets; any named variant of `DemoConfig.variants`;
   - `uniform`: the same loss on all negatives with equal weights (`U2ATrainer` without an alignment set);
   - `random`: a random subset of U2A's budget (`weighting.budget_size`, a 0/1 `weight` column);
   - `oracle`: only the `harmful` negatives (uses the labels: an upper reference, not a method);
   - `dpo`: TRL's `DPOTrainer` on positive data: the alignment pairs plus pairs of each train prompt's chosen and
     rejected answers (the baseline that needs positives).
4. Evaluation (`DemoEvaluator`, on the library's `trl_u2a.evaluation`): harmful rate of sampled generations on the
   test prompts judged by alt-profanity-check (a linear SVM on bag-of-words trained on human-labelled offensive text,
   shipped on PyPI, nobody here wrote it), and the mean judge probability over more samples per prompt (a continuous
   harm measure);
   degenerate-generation rate and a `collapsed` flag (the judge rates gibberish as harmless, so a collapsed model
   "looks" aligned); alignment loss `J` on the alignment set and DPO loss / preference accuracy on the test pairs
   (against the start model); retain perplexity (utility); selection precision by kind, at the end and at the first
   and last refresh.
5. Report: `results.json`, tables with legends (mean ± std over seeds; paired differences against `uniform` at the
   same seed, setting, learning rate and loss with 95 % paired bootstrap intervals over seeds; the share of the
   oracle's gain U2A recovers; verdicts "holds" / "does not hold" / "inconclusive (interval spans 0)"), PNG plots.

Entry points: `run_demo(DemoConfig)` and `trl-u2a demo` (`trl_u2a.scripts.demo`); both need the `[demo]` extra
(matplotlib and alt-profanity-check). Modules: `config` (DemoConfig), `models` (the task and the cached start model),
`metrics` (the evaluator and the selection metrics), `runs` (one training run per method), `pipeline` (`run_demo`),
`stats` (summaries, paired bootstrap intervals, verdicts), `report` (tables), `plots`.
"""

from .config import BASELINES, KINDS, LOSSES, SETTINGS, DemoConfig, u2a_defaults
from .metrics import DemoEvaluator, degenerate, refresh_precision, selection_metrics
from .models import MemorisedStartModelError, StartModel, default_cache_dir, load_task, start_model
from .pipeline import run_demo
from .plots import make_plots, plot_harm_vs_ppl, plot_refreshes_by_kind, plot_trajectories, read_trace
from .report import (
    format_evidence,
    format_frontier,
    format_frontier_points,
    format_points,
    format_table,
    one_seed_note,
    verdict_lines,
)
from .runs import (
    RunOutput,
    dpo_pairs,
    lora_config,
    oracle_weights,
    plan_runs,
    random_subset,
    run_dpo,
    run_u2a,
    run_unlearning,
)
from .stats import (
    INCONCLUSIVE,
    MIN_SEEDS,
    bootstrap_recovery,
    claim,
    frontier,
    paired_bootstrap_ci,
    recovery_share,
    summarize,
    verdict,
)

__all__ = [
    "BASELINES",
    "INCONCLUSIVE",
    "KINDS",
    "LOSSES",
    "MIN_SEEDS",
    "SETTINGS",
    "DemoConfig",
    "DemoEvaluator",
    "MemorisedStartModelError",
    "RunOutput",
    "StartModel",
    "bootstrap_recovery",
    "claim",
    "default_cache_dir",
    "degenerate",
    "dpo_pairs",
    "format_evidence",
    "format_frontier",
    "format_frontier_points",
    "format_points",
    "format_table",
    "frontier",
    "load_task",
    "lora_config",
    "make_plots",
    "one_seed_note",
    "oracle_weights",
    "paired_bootstrap_ci",
    "plan_runs",
    "plot_harm_vs_ppl",
    "plot_refreshes_by_kind",
    "plot_trajectories",
    "random_subset",
    "read_trace",
    "recovery_share",
    "refresh_precision",
    "run_demo",
    "run_dpo",
    "run_u2a",
    "run_unlearning",
    "selection_metrics",
    "start_model",
    "summarize",
    "u2a_defaults",
    "verdict",
    "verdict_lines",
]
