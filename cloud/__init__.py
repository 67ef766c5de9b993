"""edgepipe cloud package."""
