"""Outputs and their bookkeeping: names, encoding, the index and failure records, the job record."""
