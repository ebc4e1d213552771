"""Boot loaders: kernel image formats and where they go in guest RAM."""
