"""The run summary the flow publishes as a Prefect markdown artifact: presentation only.

Imports nothing from Prefect so it can be rendered (and tested) on its own.
"""
from __future__ import annotations

import re
import shlex

# evaluate writes one latency per batch size in params.yaml's evaluate.latency_batch_sizes.
_LATENCY_KEY = re.compile(r"latency_ms_b(\d+)")


def evaluation_markdown(evaluation: dict, latency: dict[str, dict], bento_tag: str) -> str:
    """Markdown for evaluate's details and latencies ({"latency_ms_b1": {variant: ms}, ...}):
    the variants table, plus the champion's Bento tag."""
    variants = {name: {**metrics, **{key: by_variant[name] for key, by_variant in latency.items()
                                     if name in by_variant}}
                for name, metrics in evaluation["variants"].items()}
    selected = evaluation["selected"]
    if selected not in variants:
        raise ValueError(f"evaluation: selected variant {selected!r} is not in variants {sorted(variants)}")
    batch_sizes = sorted({int(m.group(1)) for metrics in variants.values()
                          for key in metrics if (m := _LATENCY_KEY.fullmatch(key))})

    # MACs: counted by compress since issue 5; evaluation files from before have none.
    with_macs = any("macs" in metrics for metrics in variants.values())
    header = (["variant", "accuracy", "macro-F1", "size (kB)"] + ["MACs (k)"] * with_macs
              + [f"latency b{b} (ms)" for b in batch_sizes] + ["eligible", "selected"])
    lines = [
        "# Kiln evaluation",
        "",
        f"Selected variant: **{selected}**. Champion Bento: `{bento_tag}`.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(header) - 3) + [":---:"] * 2) + "|",
    ]
    for name, metrics in variants.items():
        try:
            cells = [name, f"{metrics['accuracy']:.4f}", f"{metrics['macro_f1']:.4f}",
                     f"{metrics['size_bytes'] / 1000:.1f}"]  # kB = 1000 bytes
            cells += [f"{metrics['macs'] / 1000:.1f}" if "macs" in metrics else "n/a"] * with_macs
            cells += [f"{metrics[f'latency_ms_b{b}']:.3f}" if f"latency_ms_b{b}" in metrics else "n/a"
                      for b in batch_sizes]
            cells += ["yes" if metrics["eligible"] else "no", "**yes**" if name == selected else ""]
        except KeyError as e:
            raise ValueError(f"evaluation: variants.{name}: missing key {e.args[0]!r}") from None
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def not_checked(drift: dict) -> str:
    """Why validate did not check drift (its details' reason; older runs wrote none)."""
    return f"not checked: {drift.get('reason', 'no champion with a data profile')}"


def drift_markdown(validation: dict) -> str:
    """Markdown for the `drift` block of validate's details: PSI and KS per feature, then the
    block's notes, if any."""
    drift = validation.get("drift", {"status": "skipped"})
    if drift["status"] == "skipped":
        return f"\nDrift: {not_checked(drift)}.\n"
    rows = [f"| {feature} | {v['psi']:.3f} | {'n/a' if v['ks'] is None else format(v['ks'], '.3f')} |"
            for feature, v in drift["features"].items()]
    # what the modality shows beside PSI and KS (texts: the out-of-vocabulary shares)
    rows += [f"\n{note}" for note in drift.get("notes", [])]
    return (f"\nDrift against champion `{drift.get('champion')}`: **{drift['status']}**\n\n"
            "| feature | PSI | KS |\n|---|---:|---:|\n" + "\n".join(rows) + "\n")


def run_summary(evaluation: dict, package: dict, validation: dict, data_docs: str,
                to_commit: list[str], push: bool) -> list[str]:
    """What `make run` ends with: the selected variant, the champion, drift, where the reports
    are, what to commit and what to do next. `evaluation` is evaluate's --details, `package` the
    package stage's --out, `validation` validate's --details; `to_commit` the files git sees
    changed; `push` whether DVC has something to push."""
    selected, champion = evaluation["selected"], package["champion"]
    drift = validation.get("drift", {"status": "skipped"})
    lines = [
        "Kiln run finished.",
        f"  Selected variant: {selected}, test accuracy "
        f"{evaluation['variants'][selected]['accuracy']:.4f}.",
        f"  Champion: Bento {champion['bento_tag']} (model {champion['model_tag']}, test accuracy "
        f"{champion['accuracy']:.4f}); "
        + ("this run's model serves." if package["challenger_serves"] else
           "this run's model did not replace it (the package stage's log above says why)."),
        "  Drift: " + (f"{not_checked(drift)}."
                       if drift["status"] == "skipped" else
                       f"{drift['status']} against {drift.get('champion')}."),
        f"  Reports: Data Docs {data_docs}; `dvc metrics show`; `dvc plots show` writes "
        "dvc_plots/index.html.",
    ]
    if to_commit:
        lines.append("  To keep this run: git add " + " ".join(map(shlex.quote, to_commit))
                     + " && git commit" + (", then `dvc push`" if push else "")
                     + " (the champion changes for other clones only when you commit).")
    else:
        lines.append("  Nothing to commit: the workspace matches the last commit.")
    lines.append("  Next: `make serve` serves the champion on http://127.0.0.1:3000; `make "
                 "rollback` restores the one before; `dvc exp run -S train.seed=1` tries a "
                 "change without touching the champion until `dvc exp apply`.")
    return lines
