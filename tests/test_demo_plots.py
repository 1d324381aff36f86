"""The demo's plots say what they show: the refresh figure counts optimizer steps in every panel, puts each score on
its refresh's tick and names how many were scored; the trajectories mark the start model and give each setting its
own legend, learning rates told apart by line style."""

import pytest

matplotlib = pytest.importorskip("matplotlib")

from trl_u2a.demo import plots  # noqa: E402


@pytest.fixture
def figures(monkeypatch):
    """The figures the plot functions draw, kept open."""
    import matplotlib.pyplot as plt

    matplotlib.use("Agg")
    close, kept = plt.close, []
    monkeypatch.setattr(plt, "close", kept.append)
    yield kept
    for fig in kept:
        close(fig)


def test_refresh_figure_counts_steps_and_names_each_refresh(tmp_path, figures):
    kinds = ["harmful", "low_quality", "near_copy"] * 4  # 12 negatives
    trace = [{"refresh": 0, "step": 6, "id": i, "score": 0.1 * (i - 5), "weight": 1.0} for i in range(12)]
    # The later refresh scores its pool and the trained negatives only: 4 of the 12
    trace += [{"refresh": 1, "step": 12, "id": i, "score": 0.05 * i if i < 4 else None, "weight": 1.0}
              for i in range(12)]  # fmt: skip
    history = [{"refresh": 0, "step": 6, "objective": 0.69}, {"refresh": 1, "step": 12, "objective": 0.6},
               {"refresh": None, "step": 30, "objective": 0.5, "final": True}]  # fmt: skip
    run = {"loss": "npo", "setting": "lora", "lr": 3e-4, "seed": 0, "history": history, "weights": [1.0] * 3}
    plots.plot_refreshes_by_kind(run, trace, kinds, tmp_path / "refreshes.png")
    (fig,) = figures
    scores, _mass, objective = fig.axes
    xs = {float(x) for collection in scores.collections for x, _ in collection.get_offsets()}
    assert xs == {6.0, 12.0}  # on the refreshes' own steps, no sideways offset per kind
    assert [t.get_text() for t in scores.get_xticklabels()] == ["6\nrefresh 0\nn=12", "12\nrefresh 1\nn=4"]
    assert {ax.get_xlabel() for ax in fig.axes} == {"optimizer step"}
    assert [t.get_text() for t in objective.get_xticklabels()] == ["6", "12", "30"]
    assert (tmp_path / "refreshes.png").stat().st_size > 1000


def _run(setting, lr, method, loss, ppl_end, harm_end):
    trajectory = [{"step": 0, "retain_ppl": 2.8, "harmful_rate": 0.42},
                  {"step": 30, "retain_ppl": ppl_end, "harmful_rate": harm_end}]  # fmt: skip
    return {"setting": setting, "lr": lr, "method": method, "loss": loss, "trajectory": trajectory}


def test_trajectories_mark_the_start_and_keep_each_settings_learning_rates_apart(tmp_path, figures):
    runs = [_run("full", 1e-4, "u2a", "npo", 2.9, 0.2), _run("full", 1e-4, "dpo", "dpo", 2.6, 0.1)]
    runs += [_run("lora", lr, "u2a", "npo", 2.9, 0.3) for lr in (3e-4, 5e-4)]
    plots.plot_trajectories(runs, tmp_path / "trajectories.png")
    (fig,) = figures
    legends = [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
    labels = [[t.get_text() for t in legend.get_texts()] for legend in legends]
    assert labels == [["u2a", "dpo", "start model"], ["u2a, lr 0.0003", "u2a, lr 0.0005", "start model"]]
    lora = fig.axes[-1]
    styles = {line.get_label(): line.get_linestyle() for line in lora.get_lines()}
    assert styles["u2a, lr 0.0003"] != styles["u2a, lr 0.0005"]
    star = next(line for line in lora.get_lines() if line.get_label() == "start model")
    assert tuple(star.get_xydata()[0]) == (2.8, 0.42)
    assert "dpo also lowers the retain perplexity" in fig._suptitle.get_text()
