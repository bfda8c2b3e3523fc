"""tether annotate: collecting human preference judgements (issue 16)."""
