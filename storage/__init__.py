"""edgepipe storage package."""
