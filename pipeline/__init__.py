"""edgepipe pipeline package."""
