"""MONAI Label task classes for the hemorrhage app: thin wiring around the `ichal` library."""
