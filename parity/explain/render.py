"""The explanation as reports show it (pure Python: the report layer imports this, never torch)."""

from __future__ import annotations


def likely_cause_markdown(explanation: dict) -> str:
    """One Markdown paragraph: the summary and, when explained, the one-line fix."""
    summary = str(explanation.get("summary") or "no explanation").replace("|", "\\|")
    fix = explanation.get("fix")
    return f"**Likely cause:** {summary}" + (f"  \n**Fix:** {fix}" if fix else "")
