"""edgepipe sync package."""
