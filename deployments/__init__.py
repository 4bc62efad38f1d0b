"""One Ray Serve deployment per file: load in __init__, one step per call."""
