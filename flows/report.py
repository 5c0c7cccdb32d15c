"""The run summary the flow publishes as a Prefect markdown artifact: presentation only.

Imports nothing from Prefect so it can be rendered (and tested) on its own.
"""
from __future__ import annotations

import re

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


def drift_markdown(validation: dict) -> str:
    """Markdown for the `drift` block of validate's details: PSI and KS per feature, then the
    block's notes, if any."""
    drift = validation.get("drift", {"status": "skipped"})
    if drift["status"] == "skipped":
        return "\nDrift: not checked (no champion with a data profile yet).\n"
    rows = [f"| {feature} | {v['psi']:.3f} | {'n/a' if v['ks'] is None else format(v['ks'], '.3f')} |"
            for feature, v in drift["features"].items()]
    # what the modality shows beside PSI and KS (texts: the out-of-vocabulary shares)
    rows += [f"\n{note}" for note in drift.get("notes", [])]
    return (f"\nDrift against champion `{drift.get('champion')}`: **{drift['status']}**\n\n"
            "| feature | PSI | KS |\n|---|---:|---:|\n" + "\n".join(rows) + "\n")
