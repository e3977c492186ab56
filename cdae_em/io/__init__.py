"""Particle files: STAR tables, MRC stacks, writes that never leave a half-written file, page release of memory maps."""
