"""The vocabulary is one: the README documents every loss reason, and nothing else."""

from __future__ import annotations

import re
from pathlib import Path

from depthflow.accounting import ErrorKind, GapReason, LossReason

README = Path(__file__).resolve().parents[1] / "README.md"


def _table_after(heading: str) -> list[str]:
    text = README.read_text(encoding="utf-8")
    section = text.split(heading, 1)[1].split("\n## ", 1)[0]
    return [line for line in section.splitlines() if line.startswith("| `")]


def test_the_readme_loss_table_lists_exactly_the_loss_reasons() -> None:
    first_cells = [row.split("|")[1] for row in _table_after("## Data loss reasons")]
    documented = {name for cell in first_cells for name in re.findall(r"`(\w+)`", cell)}
    assert documented == {reason.value for reason in LossReason}


def test_the_readme_names_every_gap_reason() -> None:
    section = README.read_text(encoding="utf-8").split("## The gap ledger", 1)[1]
    missing = [r.value for r in GapReason if f"`{r.value}`" not in section.split("\n## ", 1)[0]]
    assert missing == []


def test_a_frame_rejection_names_the_same_loss_reason_and_error_kind() -> None:
    # The pipeline counts a bad frame under both; the labels must not drift apart.
    for reason in (LossReason.MALFORMED, LossReason.UNKNOWN_EVENT, LossReason.UNKNOWN_SYMBOL):
        assert ErrorKind(reason.value).value == reason.value
