"""The run summary the flow publishes as a Prefect markdown artifact: presentation only.

Imports nothing from Prefect so it can be rendered (and tested) on its own.
"""
from __future__ import annotations

import re

# evaluate writes one latency per batch size in params.yaml's evaluate.latency_batch_sizes.
_LATENCY_KEY = re.compile(r"latency_ms_b(\d+)")


def evaluation_markdown(evaluation: dict, bento_tag: str) -> str:
    """Markdown for reports/evaluation.json (the variants table) plus the packaged Bento's tag."""
    variants: dict[str, dict] = evaluation["variants"]
    selected = evaluation["selected"]
    if selected not in variants:
        raise ValueError(f"evaluation: selected variant {selected!r} is not in variants {sorted(variants)}")
    batch_sizes = sorted({int(m.group(1)) for metrics in variants.values()
                          for key in metrics if (m := _LATENCY_KEY.fullmatch(key))})

    header = (["variant", "accuracy", "macro-F1", "size (kB)"]
              + [f"latency b{b} (ms)" for b in batch_sizes] + ["eligible", "selected"])
    lines = [
        "# Kiln evaluation",
        "",
        f"Selected variant: **{selected}**, packaged as Bento `{bento_tag}`.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(header) - 3) + [":---:"] * 2) + "|",
    ]
    for name, metrics in variants.items():
        try:
            cells = [name, f"{metrics['accuracy']:.4f}", f"{metrics['macro_f1']:.4f}",
                     f"{metrics['size_bytes'] / 1000:.1f}"]  # kB = 1000 bytes
            cells += [f"{metrics[f'latency_ms_b{b}']:.3f}" if f"latency_ms_b{b}" in metrics else "n/a"
                      for b in batch_sizes]
            cells += ["yes" if metrics["eligible"] else "no", "**yes**" if name == selected else ""]
        except KeyError as e:
            raise ValueError(f"evaluation: variants.{name}: missing key {e.args[0]!r}") from None
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
