"""coperception: cooperative V2X perception with measured, compressed message passing."""

__version__ = "0.1.0"
