"""`python -m compress ...`: the `compress` command, also what torchrun starts
(`torchrun --nproc_per_node N -m compress run CONFIG`)."""
from cli import main

main()
