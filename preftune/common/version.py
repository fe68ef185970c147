"""The package version, in one place (the package root and the layers below read it here)."""

VERSION = "0.1.0"
