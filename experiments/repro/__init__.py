"""The reproduction study: Table I, the fair per-optimizer comparison, explosions."""
