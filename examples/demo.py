"""The README's main command (./dev demo): fhir-leuko on the embedded default data in examples/.

It evaluates the hand-written example patients as of 2026-11-20 (the examples are dated around it)
and prints the DetectedIssues, one summary line each, then the summary. Extra arguments are passed
to ``fhir-leuko evaluate``.
"""

from __future__ import annotations

import sys
from pathlib import Path

from fhir_leuko.cli import main

EXAMPLES = Path(__file__).resolve().parent
AS_OF = "2026-11-20"

if __name__ == "__main__":
    args = ["evaluate", str(EXAMPLES / "ward"), str(EXAMPLES / "bulk-export"), "--as-of", AS_OF]
    sys.exit(main([*args, *sys.argv[1:]]))
