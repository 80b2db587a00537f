"""`python -m seqlab CMD`: the same command line as `python seqlstm.py CMD`."""

from seqlab.cli import main

main()
