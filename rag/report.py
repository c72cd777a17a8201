"""Writes an evaluation run as `results.json`, `report.md` and PNG plots."""

from __future__ import annotations

import json
from pathlib import Path

METRIC_LABELS = {"exact_match": "EM", "f1": "F1", "rouge_l": "ROUGE-L", "grounded": "grounded",
                 "citation_precision": "citation precision", "accuracy": "accuracy"}


def _interval(entry: dict) -> str:
    low, high = entry["ci95"]
    return f"{entry['mean']:.3f} [{low:.3f}, {high:.3f}]" if entry["n"] else "–"


def write_report(run, command: str) -> Path:
    out = run.config.out_dir
    summary = run.summary
    (out / "results.json").write_text(json.dumps(
        {"config": _config_dict(run.config), "summary": summary, "questions": run.rows, "retrieval": run.retrieval}, indent=1))
    plots = _plots(run)

    metrics = [m for m in METRIC_LABELS if any(m in entry for entry in summary["paths"].values())]
    lines = [f"# Evaluation: {Path(summary['dataset']).name}", "", f"Command: `{command}`", "",
             f"{summary['questions']} questions; mean with bootstrap 95% interval.", ""]
    header = ["path", *[METRIC_LABELS[m] for m in metrics], "p50 ms", "p95 ms", "prompt tok", "completion tok", "tok/s"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for path, entry in summary["paths"].items():
        cells = [path, *[_interval(entry[m]) for m in metrics], f"{entry['latency_ms']['p50']:.0f}",
                 f"{entry['latency_ms']['p95']:.0f}", f"{entry['prompt_tokens']:.0f}",
                 f"{entry['completion_tokens']:.1f}", f"{entry['tokens_per_second']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    abstaining = {path: entry["abstention"] for path, entry in summary["paths"].items() if "abstention" in entry}
    if abstaining:
        threshold = next(iter(abstaining.values()))["threshold"]
        lines += ["", f"With abstention (called not answerable below confidence {threshold:.3f}; every question here "
                  "is answerable, so each abstention is a false one and scores F1 0):", "",
                  "| path | false abstention | F1 with abstention | F1 drop |", "|---|---|---|---|"]
        lines += [f"| {path} | {_interval(a['false_abstention'])} | {_interval(a['f1'])} | {a['f1_drop']:+.3f} |"
                  for path, a in abstaining.items()]
    if "majority_class" in summary:
        majority = summary["majority_class"]
        lines += ["", f"Majority class ('{majority['label']}'): {majority['rate']:.3f}. Balanced accuracy is the mean "
                  "recall over the gold labels: a constant answer scores 1 / (number of labels).", "",
                  "| path | answers given | balanced accuracy |", "|---|---|---|"]
        lines += [f"| {path} | {', '.join(f'{label} {n}' for label, n in entry['predicted'].items())} | "
                  f"{entry['balanced_accuracy']:.3f} |" for path, entry in summary["paths"].items()]
    if summary["comparisons"]:
        lines += ["", f"Paired differences in {METRIC_LABELS[summary['headline_metric']]} (same questions):", "",
                  "| a − b | difference | 95% interval | verdict |", "|---|---|---|---|"]
        for c in summary["comparisons"]:
            verdict = "a better" if c["significant"] and c["difference"] > 0 else (
                "b better" if c["significant"] else "within noise")
            lines.append(f"| {c['a']} − {c['b']} | {c['difference']:+.3f} | [{c['ci95'][0]:+.3f}, "
                         f"{c['ci95'][1]:+.3f}] | {verdict} |")
    if "retrieval" in summary:
        ks = list(next(iter(summary["retrieval"].values())))
        lines += ["", "Retrieval of the gold passage:", "", "| retriever | " + " | ".join(ks) + " |",
                  "|---|" + "---|" * len(ks)]
        for kind, values in summary["retrieval"].items():
            lines.append(f"| {kind} | " + " | ".join(f"{values[k]:.3f}" for k in ks) + " |")
    lines += ["", "Groundedness: share of answers whose content words (SQuAD-normalised, stopwords removed) occur "
              "at least 80% in the chunks they cite (or, citing none, in the chunks they were shown). Citation "
              "precision: share of cited chunks that contain a gold answer.", ""]
    lines += [f"![{name}]({name})" for name in plots]
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report


def _config_dict(config) -> dict:
    from dataclasses import asdict

    return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()}


def _plots(run) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out, summary, names = run.config.out_dir, run.summary, []
    metric = summary["headline_metric"]
    paths = list(summary["paths"])
    means = [summary["paths"][p][metric]["mean"] for p in paths]
    errors = [[m - summary["paths"][p][metric]["ci95"][0] for p, m in zip(paths, means)],
              [summary["paths"][p][metric]["ci95"][1] - m for p, m in zip(paths, means)]]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.bar(paths, means, yerr=errors, capsize=6, color="#4c72b0")
    if "majority_class" in summary:
        ax.axhline(summary["majority_class"]["rate"], ls="--", color="grey", label="majority class")
        ax.legend()
    ax.set_ylabel(METRIC_LABELS[metric] + " (95% CI)")
    ax.set_ylim(0, 1)
    fig.tight_layout()
    fig.savefig(out / "metric_by_path.png", dpi=110)
    names.append("metric_by_path.png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.boxplot([[row["latency_ms"] for row in run.rows if row["path"] == p] for p in paths], tick_labels=paths)
    ax.set_ylabel("latency per answer (ms)")
    fig.tight_layout()
    fig.savefig(out / "latency.png", dpi=110)
    names.append("latency.png")
    plt.close(fig)

    if "retrieval" in summary:
        fig, ax = plt.subplots(figsize=(5, 3.2))
        for kind, values in summary["retrieval"].items():
            ks = [int(key.split("@")[1]) for key in values if key.startswith("recall@")]
            ax.plot(ks, [values[f"recall@{k}"] for k in ks], marker="o", label=kind)
        ax.set_xlabel("k")
        ax.set_ylabel("recall@k (gold passage)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "recall_at_k.png", dpi=110)
        names.append("recall_at_k.png")
        plt.close(fig)
    return names
