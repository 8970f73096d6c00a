"""Worked examples beyond thyroid scintigraphy (training/README.md, "Worked example: CT liver")."""
