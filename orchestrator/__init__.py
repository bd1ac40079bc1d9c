"""The orchestrator: search algorithms (pure) and, around them, the drivers that run them."""
