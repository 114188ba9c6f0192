"""How workers are started: the Ray cluster connection and gangs of worker actors."""
