"""Tables the commands print: Markdown, as llama-bench prints them; they read as is in a terminal and
render in an issue."""

from __future__ import annotations


def markdown_table(head: list[str], rows: list[list[str]], left: int = 0) -> str:
    """Columns before `left` align left, the others (numbers) right."""
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]

    def line(cells: list[str]) -> str:
        padded = (c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join("-" * (w + 2) if i < left else "-" * (w + 1) + ":" for i, w in enumerate(widths)) + "|"
    return "\n".join([line(head), rule, *map(line, rows)])
