"""quantlib package."""
