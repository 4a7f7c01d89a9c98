"""A tool for tests/test_approvals.py whose every execution is counted: one JSON line of its
arguments appended to the file named by CHORUS_TEST_CHARGES (in subprocess agents too)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from chorus.tools import tool


@tool
def charge(memo: str, amount: int = 500) -> str:
    """Charge the customer's card.

    Args:
        memo: what the charge is for
        amount: in cents
    """
    with Path(os.environ["CHORUS_TEST_CHARGES"]).open("a") as sink:
        sink.write(json.dumps({"memo": memo, "amount": amount}) + "\n")
    return f"charged {amount} for {memo}"
