"""`python -m peftlab` (used by `accelerate launch -m peftlab train ...`)."""

from peftlab.cli import main

main()
