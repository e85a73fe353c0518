"""Stage 5, compile: the vamc YAML (config.py), the checks before it runs (checks.py), the vamc driver
(vamc.py), the checks of what it wrote (output.py), and the published models' configs (known_models.py)."""
