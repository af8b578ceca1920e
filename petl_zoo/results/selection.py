"""A tuning record as a table: every grid point's setting and val accuracy, the winner marked, the rule
and the retrained seeds (``petl-zoo table --selection``)."""

from __future__ import annotations

from typing import Any

from ..runfolder import Selection
from .aggregate import as_percent
from .render import grid_latex, grid_markdown

__all__ = ["render_selection"]


def _point_text(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def render_selection(sel: Selection, fmt: str = "markdown") -> str:
    """One tuning record: every grid point's setting and val accuracy, the winner marked, the rule."""
    keys = list(sel.grid)
    headers = keys + ["Val acc (%)", "Winner"]
    body = []
    for point in sel.points:
        val = as_percent(point.val_accuracy)
        body.append(
            [_point_text(point.setting.get(k, "")) for k in keys]
            + ["" if val is None else f"{val:.1f}", "winner" if sel.is_winner(point) else ""]
        )
    seeds = ", ".join(str(seed) for seed, _ in sel.retrained) or "none yet"
    title = f"Selection: {sel.method} on {sel.task} (grid {sel.grid_fingerprint[:8]}: {' x '.join(keys)})"
    notes = [f"rule: {sel.rule or 'not recorded'}", f"winner retrained with seeds {seeds} ({sel.path})"]
    grid = grid_latex if fmt == "latex" else grid_markdown
    return grid(title, headers, body, notes, len(keys))
