"""What every layer uses: the typed experiment config, user-facing errors, seeded random streams
and the location of the shipped assets."""
