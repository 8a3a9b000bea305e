"""`python -m peftcli ...` (what `accelerate launch -m peftcli` runs)."""
from .cli import main

main()
