"""The error a bad config raises. Its own file so that the small grammars of config values (specs.py) and
the config schema can both use it without importing each other."""


class ConfigError(ValueError):
    """A config problem, reported to the user as one line naming the problem and the fix."""
