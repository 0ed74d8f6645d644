"""perk_fast: PERK made fast and memory-efficient."""
