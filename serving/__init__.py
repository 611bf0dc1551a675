"""The serving API that follows the registry's champion (see `serving.app`)."""
