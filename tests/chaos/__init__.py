"""Fault injection against the real CLI: scenarios, their audit, and the reliability report.

`harness` holds the pieces (the audit of OUT, a moto server, the driver killer), `scenarios`
the registry of named scenarios, `report` the script that runs them and writes
docs/reliability.md. Nothing here needs pytest: `python -m tests.chaos.report` runs it all.
"""
