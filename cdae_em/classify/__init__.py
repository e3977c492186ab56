"""The classification stage: 2D classes up to rotation and shift, merge-and-split moves."""
