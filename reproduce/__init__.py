"""Declarative table specs (TOML files beside this one), shipped as package data."""
