"""The report after tuning: did the preferred property go up, did the model stay a language model?

Written next to the tuned weights as `report.json`, `report.md` and `report.png`:

- preferred-property rate before/after: the share of samples a scorer (`aigc.evaluation.scorers`,
  e.g. `sentiment` = P(positive)) scores above 0.5, from the old and the new weights on the same
  prompts and seeds;
- win rate vs the previous version: a simulated judge (the same scorer) on those paired samples;
  a win is a higher score, a tie counts half;
- held-out LM loss before/after (the guard) and the held-out preference metrics (reward margin
  and accuracy of the implicit reward on held-out pairs);
- the training curves (loss, reward margin) and before/after bars in `report.png`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from aigc.errors import AigcError
from aigc.utils.io import atomic_write, atomic_write_json, atomic_write_text

PREFERRED_THRESHOLD = 0.5  # a sample "has the property" when its score is above this


def _prompts(data: Any, cfg: Any) -> list[str]:
    """The prompts to sample: tune.prompts, else the feedback's prompts, most frequent first."""
    if cfg.prompts:
        return list(cfg.prompts)
    counts: dict[str, int] = {}
    for r in data.train + data.heldout:
        counts[r["prompt"]] = counts.get(r["prompt"], 0) + 1
    return sorted(counts, key=lambda p: -counts[p]) or [""]


def _generator(base: Any, model: Any) -> Any:
    if base.kind == "hf":
        from aigc.generation.hf import HFTextGenerator

        return HFTextGenerator(model.hf.eval(), base.tokenizer)
    from aigc.generation.text import TextGenerator

    return TextGenerator(model.eval(), base.tokenizer)


def _old_model(base: Any) -> Any:
    if base.kind == "hf":
        from aigc.models.hf_causal import HFCausalLM

        return HFCausalLM(base.dir)
    from aigc.registry import load_artifact

    return load_artifact(base.dir).model


def sample_pairs(base: Any, tuned_model: Any, cfg: Any, prompts: list[str]) -> list[dict[str, Any]]:
    """`cfg.samples` generations from the old and the tuned weights, same prompt and seed each."""
    from aigc.generation.params import GenerationParams

    jobs = []
    for i in range(cfg.samples):
        params = GenerationParams(max_new_tokens=cfg.sample_tokens, temperature=cfg.temperature,
                                  top_k=cfg.top_k, seed=cfg.seed * 100_003 + i)  # fmt: skip
        jobs.append((prompts[i % len(prompts)], params))
    old = _generator(base, _old_model(base)).generate_batch(jobs)
    new = _generator(base, tuned_model).generate_batch(jobs)
    return [{"prompt": p, "seed": a.seed, "before": a.text, "after": b.text}
            for (p, _), a, b in zip(jobs, old, new, strict=True)]  # fmt: skip


def _curves(metrics_path: Path) -> dict[str, list[list[float]]]:
    from aigc.training.metrics import read_metrics

    if not metrics_path.is_file():
        return {}
    out: dict[str, list[list[float]]] = {}
    for r in read_metrics(metrics_path):
        for key in ("loss", "reward_margin", "heldout_reward_margin", "heldout_reward_acc", "heldout_loss"):
            if key in r and (r.get("kind") == "train") == (not key.startswith("heldout")):
                out.setdefault(key, []).append([r["step"], r[key]])
    return out


def build_report(
    *,
    base: Any,
    tuned_dir: Path,
    tuned_model: Any,
    data: Any,
    cfg: Any,
    guard: Any,
    metrics_path: Path,
    scorer: str | None,
    steps: int,
    elapsed: float,
    target: Path,
    log: Any = None,
) -> dict[str, Any]:
    """The report dict; samples and scores only when `tuned_model` is given (the guard passed)."""
    curves = _curves(metrics_path)
    last = {k: v[-1][1] for k, v in curves.items() if v}
    rep: dict[str, Any] = {
        "kind": "tune",
        "method": cfg.method,
        "published": guard.ok,
        "reason": guard.reason,
        "model": {"base": str(base.dir), "name": base.name, "version": base.version, "target": str(target)},
        "feedback": data.stats,
        "steps": steps,
        "seconds": round(elapsed, 1),
        "heldout_loss": {
            "before": guard.before,
            "after": guard.after,
            "change": guard.change,
            "limit": guard.limit,
            "source": guard.source,
            "root_model": guard.root.get("model"),  # the lineage's first version (see text.py, guard)
            "root": guard.root.get("loss"),
            "change_vs_root": (guard.after - guard.root["loss"]) / guard.root["loss"]
            if guard.root.get("loss")
            else None,
        },
        "heldout_preference": {  # at step 0 the policy is the reference: margin 0, accuracy 0
            "rows": len(data.heldout),
            "reward_margin": {"before": 0.0, "after": last.get("heldout_reward_margin")},
            "reward_acc": {"before": 0.0, "after": last.get("heldout_reward_acc")},
        },
        "curves": curves,
        "preferred": None,
        "win_rate": None,
        "examples": [],
    }
    if tuned_model is None or cfg.samples == 0:
        return rep
    pairs = sample_pairs(base, tuned_model, cfg, _prompts(data, cfg))
    rep["examples"] = pairs
    if scorer is None:
        return rep
    from aigc.evaluation.scorers import load_scorer

    judge = load_scorer(scorer)
    if judge.kind != "text":
        raise AigcError(
            f"--scorer {scorer} scores {judge.kind}s; a text model needs a text scorer (e.g. sentiment)"
        )
    before = judge.score([p["before"] for p in pairs])
    after = judge.score([p["after"] for p in pairs])
    for p, a, b in zip(pairs, before, after, strict=True):
        p["score_before"], p["score_after"] = round(a, 4), round(b, 4)
    n = len(pairs)
    rep["preferred"] = {
        "scorer": judge.name,
        "threshold": PREFERRED_THRESHOLD,
        "before": sum(s > PREFERRED_THRESHOLD for s in before) / n,
        "after": sum(s > PREFERRED_THRESHOLD for s in after) / n,
        "mean_before": sum(before) / n,
        "mean_after": sum(after) / n,
    }
    rep["win_rate"] = (
        sum(1.0 if b > a else 0.5 if b == a else 0.0 for a, b in zip(before, after, strict=True)) / n
    )
    if log:
        pr = rep["preferred"]
        log(f"preferred ({judge.name} > {PREFERRED_THRESHOLD}): {pr['before']:.1%} -> {pr['after']:.1%}, "
            f"win rate vs previous {rep['win_rate']:.1%}")  # fmt: skip
    return rep


def summary(rep: dict[str, Any]) -> dict[str, Any]:
    """Headline figures (for config.json and the CLI line)."""
    pr = rep.get("preferred") or {}
    return {
        "published": rep["published"],
        "steps": rep["steps"],
        "heldout_loss_before": rep["heldout_loss"]["before"],
        "heldout_loss_after": rep["heldout_loss"]["after"],
        "preferred_before": pr.get("before"),
        "preferred_after": pr.get("after"),
        "win_rate": rep.get("win_rate"),
    }


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{v:.1%}"


def _num(v: float | None) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4f}"


def markdown(rep: dict[str, Any]) -> str:
    m, hl, pr = rep["model"], rep["heldout_loss"], rep.get("preferred")
    status = "published" if rep["published"] else f"NOT published: {rep['reason']}"
    lines = [
        f"# Tuning report: {m['name']} ({rep['method'].upper()})",
        "",
        f"- base: `{m['base']}`; new version: `{m['target']}` ({status})",
        f"- {rep['steps']} steps in {rep['seconds']} s; feedback: "
        + ", ".join(f"{k} {v}" for k, v in rep["feedback"].items() if not isinstance(v, dict)),
        "",
        "| measure | before | after |",
        "|---|---|---|",
        f"| held-out LM loss ({hl['source']}) | {_num(hl['before'])} | {_num(hl['after'])} "
        f"({hl['change']:+.1%}, limit +{hl['limit']:.0%}) |",
    ]
    if hl.get("root_model") and hl["root"] != hl["before"]:
        lines.append(f"| held-out LM loss vs the first version ({hl['root_model']}) | {_num(hl['root'])} | "
                     f"{_num(hl['after'])} ({hl['change_vs_root']:+.1%}) |")  # fmt: skip
    hp = rep["heldout_preference"]
    if hp["rows"]:
        lines.append(
            f"| held-out reward margin ({hp['rows']} rows) | 0 | {_num(hp['reward_margin']['after'])} |"
        )
        if hp["reward_acc"]["after"] is not None:
            lines.append(f"| held-out reward accuracy | 0 | {_pct(hp['reward_acc']['after'])} |")
    if pr:
        lines.append(
            f"| preferred rate ({pr['scorer']} > {pr['threshold']}) | {_pct(pr['before'])} | {_pct(pr['after'])} |"
        )
        lines.append(f"| mean score | {pr['mean_before']:.3f} | {pr['mean_after']:.3f} |")
        lines += ["", f"Win rate of the new version vs the previous one (same prompts and seeds, judged by "
                      f"{pr['scorer']}): **{_pct(rep['win_rate'])}**."]  # fmt: skip
    lines += ["", "![tuning curves and before/after](report.png)", ""]
    if rep["examples"]:
        lines += ["## Examples (same prompt and seed)", "", "| prompt | before | after |", "|---|---|---|"]
        for e in rep["examples"][:8]:
            cell = [e["prompt"], e["before"], e["after"]]
            if "score_before" in e:
                cell[1] += f" ({e['score_before']:.2f})"
                cell[2] += f" ({e['score_after']:.2f})"
            lines.append(
                "| " + " | ".join(c.replace("|", "\\|").replace("\n", " ")[:120] for c in cell) + " |"
            )
        lines.append("")
    return "\n".join(lines)


def plot(rep: dict[str, Any], path: Path) -> Path | None:
    """Loss and reward-margin curves, and before/after bars (preferred rate, held-out loss)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    curves = rep["curves"]
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(13, 3.8), dpi=100)
    if "loss" in curves:
        ax1.plot(*zip(*curves["loss"], strict=True), label=f"{rep['method'].upper()} loss", linewidth=1)
    for key, label in (
        ("reward_margin", "reward margin (train)"),
        ("heldout_reward_margin", "reward margin (held-out)"),
    ):
        if key in curves:
            ax1.plot(
                *zip(*curves[key], strict=True),
                label=label,
                marker="o" if "heldout" in key else None,
                markersize=3,
            )
    ax1.set_xlabel("step")
    ax1.set_title(f"{rep['method'].upper()} training")
    ax1.grid(alpha=0.3)
    ax1.legend(fontsize=8)
    hl = rep["heldout_loss"]
    ax2.bar(
        ["before", "after"],
        [hl["before"], hl["after"] if math.isfinite(hl["after"]) else 0],
        color=["grey", "tab:blue"],
    )
    ax2.axhline(hl["before"] * (1 + hl["limit"]), color="tab:red", linestyle="--", label="guard limit")
    ax2.set_title("held-out LM loss")
    ax2.legend(fontsize=8)
    pr = rep.get("preferred")
    if pr:
        ax3.bar(["before", "after"], [pr["before"], pr["after"]], color=["grey", "tab:green"])
        ax3.set_ylim(0, 1)
        ax3.set_title(
            f"preferred rate ({pr['scorer'].split(':')[0]})\nwin rate vs previous {_pct(rep['win_rate'])}"
        )
    else:
        ax3.text(0.5, 0.5, "no scorer given", ha="center", va="center")
        ax3.set_axis_off()
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png"))
    plt.close(fig)
    return path


def write_report(rep: dict[str, Any], out_dir: Path) -> Path:
    """report.json + report.md + report.png in `out_dir`."""
    out_dir = Path(out_dir)
    plot(rep, out_dir / "report.png")
    atomic_write_text(out_dir / "report.md", markdown(rep))
    return atomic_write_json(out_dir / "report.json", finite(rep))


def finite(obj: Any) -> Any:
    """A JSON-safe copy: NaN / infinity become null (strict JSON has neither)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    return obj


def link_in_card(run_dir: Path) -> None:
    """Point card.md at the report (the Trainer wrote the card before the report existed)."""
    card = Path(run_dir) / "card.md"
    if card.is_file():
        text = card.read_text(encoding="utf-8")
        if "report.md" not in text:
            atomic_write_text(card, text.rstrip() + "\n\n## Tuning report\n\nSee [report.md](report.md).\n")


__all__ = [
    "build_report",
    "link_in_card",
    "markdown",
    "finite",
    "plot",
    "sample_pairs",
    "summary",
    "write_report",
]
