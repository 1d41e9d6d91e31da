"""What every layer uses: the typed experiment config, user-facing errors, seeded random streams,
the location of the shipped assets, and file writes that lose nothing when they fail."""
