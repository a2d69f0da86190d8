"""The library version, in its own module so anything can read it without importing the rest."""
__version__ = "0.2.0"
